"""candidate-retrieval: narrow a catalog of millions to ~1,000 candidates per user, in time.

Exports load lazily: ``retrieval.types`` is the ground floor every layer imports, so importing
this package must not pull in the blender and the sources (that would be an import cycle).
"""

import importlib as _importlib
import importlib.util as _importlib_util
import logging as _logging
import typing as _typing
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

if _typing.TYPE_CHECKING:
    from blender.fanout import RequiredSourceError
    from retrieval.config import ConfigError, RetrievalConfig, load_config
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
    from sources.base import Need, SkipSource, Source, SourceContext, SourceParams, register

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Candidate": "retrieval.types",
    "CandidateSet": "retrieval.types",
    "ConfigError": "retrieval.config",
    "Deadline": "retrieval.types",
    "Event": "retrieval.store",
    "MemoryStore": "retrieval.store",
    "Need": "sources.base",
    "Request": "retrieval.types",
    "RequiredSourceError": "blender.fanout",
    "RetrievalConfig": "retrieval.config",
    "Retriever": "retrieval.online.retriever",
    "SkipSource": "sources.base",
    "Source": "sources.base",
    "SourceContext": "sources.base",
    "SourceParams": "sources.base",
    "SourceReport": "retrieval.types",
    "SourceStatus": "retrieval.types",
    "Store": "retrieval.store",
    "StoreUnavailable": "retrieval.store",
    "blend": "retrieval.online.retriever",
    "load_config": "retrieval.config",
    "register": "sources.base",
}

__all__ = [
    "Candidate",
    "CandidateSet",
    "ConfigError",
    "Deadline",
    "Event",
    "MemoryStore",
    "Need",
    "Request",
    "RequiredSourceError",
    "RetrievalConfig",
    "Retriever",
    "SkipSource",
    "Source",
    "SourceContext",
    "SourceParams",
    "SourceReport",
    "SourceStatus",
    "Store",
    "StoreUnavailable",
    "__version__",
    "blend",
    "load_config",
    "register",
]


def __getattr__(name: str) -> _typing.Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_logging.getLogger(__name__).addHandler(_logging.NullHandler())
