"""candidate-retrieval: narrow a catalog of millions to ~1,000 candidates per user, in time.

The public face, imported eagerly. Inside, layers import only downwards (a test checks):
``retrieval.{errors,ids,types,redact,config}`` are the ground; ``retrieval.store`` and
``retrieval.artifacts`` hold state and formats; ``sources`` and ``blender`` the candidate
sources and the fan-out; ``retrieval.online`` serves; ``retrieval.offline`` builds;
``retrieval.evaluation`` measures and tunes; ``retrieval.tools`` is the command line.
"""

import importlib.util as _importlib_util
import logging as _logging
from pathlib import Path as _Path


def _check_siblings() -> None:
    """``sources`` and ``blender`` are top-level packages beside this one (the requested layout),
    so an app with a package of the same name earlier on ``sys.path`` would be imported in their
    place and fail somewhere deep. Say so once, naming both paths."""
    home = _Path(__file__).resolve().parent.parent
    for name in ("sources", "blender"):
        ours = home / name / "__init__.py"
        spec = _importlib_util.find_spec(name)
        found = spec.origin if spec is not None else None
        if found is None or _Path(found).resolve() != ours.resolve():
            raise ImportError(
                f"the package {name!r} resolves to {found or 'nothing'}, not to "
                f"candidate-retrieval's {ours}: another package named {name!r} comes first on "
                "sys.path (often the current directory); rename it or run from elsewhere"
            )


_check_siblings()

from blender.fanout import RequiredSourceError
from retrieval.config import ConfigError, RetrievalConfig, load_config
from retrieval.errors import (
    ArtifactError,
    ClosedError,
    IdError,
    InputError,
    RequestTooLarge,
    RetrievalError,
    SourceError,
    StoreError,
)
from retrieval.online.retriever import Retriever, blend
from retrieval.store import Event, MemoryStore, Store, StoreUnavailable
from retrieval.types import (
    Candidate,
    CandidateSet,
    Deadline,
    Request,
    SourceReport,
    SourceStatus,
)
from retrieval.version import __version__
from sources.base import Need, SkipSource, Source, SourceContext, SourceParams, register

__all__ = [
    "ArtifactError",
    "Candidate",
    "CandidateSet",
    "ClosedError",
    "ConfigError",
    "Deadline",
    "Event",
    "IdError",
    "InputError",
    "MemoryStore",
    "Need",
    "Request",
    "RequestTooLarge",
    "RequiredSourceError",
    "RetrievalConfig",
    "RetrievalError",
    "Retriever",
    "SkipSource",
    "Source",
    "SourceContext",
    "SourceError",
    "SourceParams",
    "SourceReport",
    "SourceStatus",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "__version__",
    "blend",
    "load_config",
    "register",
]

_logging.getLogger(__name__).addHandler(_logging.NullHandler())
