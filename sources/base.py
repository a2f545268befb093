"""The source contract and the registry that maps a YAML ``kind`` to a class.

A source is a small object with a name and ``retrieve(request, k, deadline) -> (ids, scores)``.
Sources that learn from data also implement ``build`` (offline) and ``load`` (online). Everything
the blender knows about a source is here; a user's own source is any subclass referenced from
YAML by import path (``mypkg.mod:MySource``).
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from retrieval.types import Deadline, ItemId, Request, UserId

if TYPE_CHECKING:
    from retrieval.events import EventLog

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
    "register",
    "resolve_kind",
]

Ranked = tuple[npt.NDArray[Any], npt.NDArray[np.float32]]
"""Item ids (int64 or str) and scores, best first, same length, ids unique."""


class SourceParams(BaseModel):
    """Base for a source kind's ``params``: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    serving_params: ClassVar[frozenset[str]] = frozenset()
    """Fields that only shape retrieval (e.g. how much history to read): changing them does not
    invalidate a build."""

    build_version: ClassVar[int] = 1
    """Bumped when the builder's output changes for the same params, so older builds are refused
    instead of served as if they were new."""


class NoParams(SourceParams):
    pass


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
    ) -> tuple[list[ItemId], list[float], list[str]]: ...

    def popular(self, segment: str | None, limit: int) -> tuple[list[ItemId], list[float]]: ...


@dataclass(frozen=True)
class SourceContext:
    """What a source gets from the retriever at construction: where artifacts live, the store."""

    artifacts: Path | None = None
    store: StoreView | None = None
    config_dir: Path = field(default_factory=Path.cwd)


class Source(ABC):
    """One candidate source.

    Subclasses set ``kind`` (the YAML name, for built-ins), ``Params`` (a ``SourceParams`` model
    validated from YAML) and ``needs``. ``retrieve`` must return at most ``k`` unique ids sorted
    by descending score, must not mutate the request, and should use ``deadline`` to do less work
    when little time is left. An unknown user or item is not an error: return fewer candidates.
    """

    kind: ClassVar[str] = ""
    Params: ClassVar[type[SourceParams]] = NoParams
    needs: ClassVar[frozenset[Need]] = frozenset()

    def __init__(self, name: str, params: SourceParams, context: SourceContext) -> None:
        self.name = name
        self.params = params
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
        return cls.build.__func__ is not Source.build.__func__  # type: ignore[attr-defined]

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing
        """Release files and handles; the retriever calls it once."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class UnknownKindError(LookupError):
    pass


class SkipSource(Exception):
    """Raised by ``retrieve`` when this request cannot be served (no vector, NaN input, ...).

    The blender reports the source as ``skipped`` with this reason; it does not count as a failure
    for the circuit breaker.
    """


# Built-in kinds are imported lazily so that importing the contract stays cheap.
BUILTIN_KINDS: dict[str, str] = {
    "covisitation": "sources.covisitation:CovisitationSource",
    "itemcf": "sources.itemcf:ItemCFSource",
    "ann": "sources.ann:AnnSource",
    "popularity": "sources.popularity:PopularitySource",
    "recent": "sources.recent:RecentSource",
}

_registry: dict[str, type[Source]] = {}
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def register(kind: str) -> Callable[[type[Source]], type[Source]]:
    """Class decorator: make ``kind`` usable in YAML without an import path."""

    def deco(cls: type[Source]) -> type[Source]:
        cls.kind = kind
        _registry[kind] = cls
        return cls

    return deco


def known_kinds() -> Sequence[str]:
    return sorted(set(BUILTIN_KINDS) | set(_registry))


def resolve_kind(kind: str) -> type[Source]:
    """The class for a YAML ``kind``: a registered name or ``package.module:ClassName``."""
    if kind in _registry:
        return _registry[kind]
    target = BUILTIN_KINDS.get(kind)
    if target is None:
        if not _IMPORT_PATH.match(kind):
            raise UnknownKindError(
                f"unknown source kind {kind!r}; allowed: {', '.join(known_kinds())}, "
                "or an import path such as 'mypkg.module:MySource'"
            )
        target = kind
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownKindError(
            f"cannot import module {module_name!r} for kind {kind!r}: {exc}"
        ) from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise UnknownKindError(
            f"{target!r} is not a candidate source: expected a subclass of sources.base.Source"
        )
    return cls
