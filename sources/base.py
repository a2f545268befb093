"""The source contract and the registry that maps a YAML ``kind`` to a class.

A source is a small object with a name and ``retrieve(request, k, deadline) -> (ids, scores)``.
Sources that learn from data also implement ``build`` (offline) and ``load`` (online). Everything
the blender knows about a source is here; a user's own source is any subclass referenced from
YAML by import path (``mypkg.mod:MySource``).

``Source`` is generic over its params model: ``class Mine(Source[MineParams])`` types
``self.params`` as ``MineParams``. ``Params`` stays the class attribute config validation reads
(derived from the type argument when a subclass does not set it); a plain ``class Mine(Source)``
with a ``Params`` attribute works as before.

Built-in kinds register their class with ``@register`` in their own module, which
``resolve_kind`` imports on first use: importing this module never loads annoy, faiss, implicit
or pyarrow.
"""

from __future__ import annotations

import importlib
import re
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from retrieval.errors import InputError
from retrieval.types import Deadline, ItemId, Request, UserId

if TYPE_CHECKING:
    from retrieval.offline.events import EventLog

__all__ = [
    "BUILTIN_KINDS",
    "Need",
    "NoParams",
    "Ranked",
    "SkipSource",
    "Source",
    "SourceContext",
    "SourceParams",
    "StoreView",
    "UnknownKindError",
    "known_kinds",
    "register",
    "resolve_kind",
]

Ranked = tuple[npt.NDArray[Any], npt.NDArray[np.float32]]
"""Item ids (int64 or str) and scores, best first, same length, ids unique."""


class SourceParams(BaseModel):
    """Base for a source kind's ``params``: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    serving_params: ClassVar[frozenset[str]] = frozenset()
    """Fields that only shape retrieval (e.g. how much history to read): changing them does not
    invalidate a build."""

    build_version: ClassVar[int] = 1
    """Bumped when the builder's output changes for the same params, so older builds are refused
    instead of served as if they were new."""


class NoParams(SourceParams):
    """The params of a source that takes none: ``params`` must be empty (or left out)."""


class Need(StrEnum):
    """What a source needs from a request; a request that lacks it skips the source."""

    USER_ID = "user_id"
    HISTORY = "history"
    VECTOR = "vector"
    ARTIFACTS = "artifacts"


class StoreView(Protocol):
    """The part of the online store a source may read or feed."""

    def history(
        self, user_id: UserId, limit: int | None = None
    ) -> tuple[list[ItemId], list[float], list[str]]:
        """The user's newest ``limit`` events (``None``: every kept one), oldest first, as item
        ids, timestamps (seconds) and event types; empty for an unknown user, and when the
        store fails. Never raises."""
        ...

    def popular(self, segment: str | None, limit: int) -> tuple[list[ItemId], list[float]]:
        """The live top ``limit`` items of ``segment`` (a ``"<column>=<value>"`` key; ``None``:
        global) and their weights decayed to now, best first; empty when nothing was recorded
        there, and when the store fails. Never raises."""
        ...


@dataclass(frozen=True)
class SourceContext:
    """What a source gets from the retriever at construction: where artifacts live, the store."""

    artifacts: Path | None = None
    store: StoreView | None = None
    config_dir: Path = field(default_factory=Path.cwd)


P = TypeVar("P", bound=SourceParams)


class Source(ABC, Generic[P]):
    """One candidate source.

    Subclasses set ``kind`` (the YAML name, for built-ins: set by ``@register``), ``Params`` (a
    ``SourceParams`` model validated from YAML) and ``needs``. ``retrieve`` must return at most
    ``k`` unique ids sorted by descending score, must not mutate the request, and should use
    ``deadline`` to do less work when little time is left. An unknown user or item is not an
    error: return fewer candidates.

    ``Source[MyParams]`` types ``self.params``; ``Params`` then defaults to ``MyParams``, and a
    ``Params`` set explicitly must be that class or a subclass of it. The constructor refuses
    params of another class than ``Params``, unless the class (like sources written before the
    typed contract) never declared its params: those get whatever they are given, as before.
    """

    kind: ClassVar[str] = ""
    Params: ClassVar[type[SourceParams]] = NoParams
    needs: ClassVar[frozenset[Need]] = frozenset()
    reads: ClassVar[frozenset[str]] = frozenset({"event_type", "session_id", "weight", "segments"})
    """The optional log columns ``build`` uses (roles of ``events.columns``, plus ``segments``);
    a build reads only what its sources name. The default names all of them."""
    _declares_params: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = _declared_params(cls)
        if declared is not None:
            if "Params" not in cls.__dict__:
                cls.Params = declared
            elif not (isinstance(cls.Params, type) and issubclass(cls.Params, declared)):
                raise TypeError(
                    f"{cls.__qualname__}: Params is {_name(cls.Params)} but the class is "
                    f"declared over {_name(declared)}; they must agree"
                )
        if "Params" in cls.__dict__:
            cls._declares_params = True

    def __init__(self, name: str, params: P, context: SourceContext) -> None:
        """Keep the source's YAML ``name``, its validated ``params`` and the ``context``; a
        ``TypeError`` when a class that declares its ``Params`` gets params of another class."""
        expected = type(self).Params
        if type(self)._declares_params and not isinstance(params, expected):
            raise TypeError(
                f"source {name!r} ({type(self).__qualname__}) needs params of type "
                f"{_name(expected)}, got {_name(type(params))}"
            )
        self.name = name
        self.params: P = params
        self.context = context

    @abstractmethod
    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        """Up to ``k`` ranked candidates for ``request``."""

    def live_popular(self, request: Request, k: int) -> tuple[Sequence[str | None], int]:
        """The live popular lists (segment keys) and how many items of each this source will
        read from ``request.live_popular``: the retriever fetches them all in its one store
        round trip, so no source reads the store on the hot path."""
        return (), 0

    def missing(self, request: Request) -> str | None:
        """Why this request cannot be served by this source, or None when it can."""
        if Need.USER_ID in self.needs and request.user_id is None:
            return "request has no user_id"
        if Need.HISTORY in self.needs and not request.history and not request.seed_items:
            return "request has no history or seed items"
        if Need.VECTOR in self.needs and request.vector is None:
            return "request has no vector"
        return None

    @classmethod
    def build(
        cls,
        events: EventLog,
        out_dir: Path,
        params: SourceParams,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Write this source's artifacts under ``out_dir``; return counts for the manifest."""
        raise NotImplementedError(f"source kind {cls.kind or cls.__name__} has no offline build")

    @classmethod
    def learns(cls) -> bool:
        """True when the class overrides ``build``: it learns from the event log, so ``retrieval
        build`` builds it, its artifacts are checked against its params at load, and params
        outside ``Params.serving_params`` need a new build when they change."""
        return cls.build.__func__ is not Source.build.__func__  # type: ignore[attr-defined]

    def close(self) -> None:  # optional hook: most sources hold nothing
        """Release files and handles; the retriever calls it once."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class UnknownKindError(InputError, LookupError):
    """A YAML ``kind`` that names no source: not built in, not registered, not importable."""


class SkipSource(Exception):
    """Raised by ``retrieve`` when this request cannot be served (no vector, NaN input, ...).

    The blender reports the source as ``skipped`` with this reason; it does not count as a failure
    for the circuit breaker.
    """


def _name(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else repr(cls)


def _declared_params(cls: type) -> type[SourceParams] | None:
    """The concrete params class in ``cls``'s own ``Source[...]`` base, if it names one."""
    for base in cls.__dict__.get("__orig_bases__", ()):
        origin = typing.get_origin(base)
        if not (isinstance(origin, type) and issubclass(origin, Source)):
            continue
        for arg in typing.get_args(base):
            if isinstance(arg, type) and issubclass(arg, SourceParams):
                return arg
    return None


# Built-in kinds and the module whose ``@register`` defines each. Imported on first use, so that
# importing the contract stays cheap (no annoy, faiss, implicit or pyarrow).
BUILTIN_KINDS: Mapping[str, str] = MappingProxyType(
    {
        "covisitation": "sources.covisitation",
        "itemcf": "sources.itemcf",
        "ann": "sources.ann",
        "popularity": "sources.popularity",
        "recent": "sources.recent",
    }
)

_registry: dict[str, type[Source[Any]]] = {}
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

_S = TypeVar("_S", bound="type[Source[Any]]")


def register(kind: str) -> Callable[[_S], _S]:
    """Class decorator: make ``kind`` usable in YAML without an import path.

    The built-in names belong to their modules: another class cannot take one over.
    """

    def deco(cls: _S) -> _S:
        home = BUILTIN_KINDS.get(kind)
        if home is not None and cls.__module__ != home:
            raise ValueError(
                f"cannot register {_name(cls)} as {kind!r}: that is the built-in kind of {home}"
            )
        cls.kind = kind
        _registry[kind] = cls
        return cls

    return deco


def known_kinds() -> Sequence[str]:
    """Every name ``resolve_kind`` accepts without an import path (built-ins not imported)."""
    return sorted(set(BUILTIN_KINDS) | set(_registry))


def resolve_kind(kind: str) -> type[Source[Any]]:
    """The class for a YAML ``kind``: a built-in or registered name, or ``package.module:Class``."""
    builtin = BUILTIN_KINDS.get(kind)
    if builtin is not None:
        if kind not in _registry:
            _import(builtin, kind)
        cls = _registry.get(kind)
        if cls is None:  # pragma: no cover - a built-in module without its @register
            raise UnknownKindError(f"module {builtin!r} did not register the kind {kind!r}")
        return cls
    if kind in _registry:
        return _registry[kind]
    if not _IMPORT_PATH.match(kind):
        raise UnknownKindError(
            f"unknown source kind {kind!r}; allowed: {', '.join(known_kinds())}, "
            "or an import path such as 'mypkg.module:MySource'"
        )
    module_name, _, attr = kind.partition(":")
    cls = getattr(_import(module_name, kind), attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise UnknownKindError(
            f"{kind!r} is not a candidate source: expected a subclass of sources.base.Source"
        )
    return cls


def _import(module_name: str, kind: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownKindError(
            f"cannot import module {module_name!r} for kind {kind!r}: {exc}"
        ) from exc
