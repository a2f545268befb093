"""Value types shared by every layer: the request, the deadline and the columnar result."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from retrieval.errors import InputError
from retrieval.ids import id_array, lookup_ids

MAX_K = 1_000_000
"""The most candidates one blend may return (the config's ``k`` and a request's alike)."""

ItemId = int | str
UserId = int | str

DEFAULT_EVENT_WEIGHTS: dict[str, float] = {"click": 1.0, "cart": 3.0, "order": 6.0}
"""The one default event-type weight table (unknown types weigh 1): builders, sources and the
live stores' counters. Here, not with the event reader, so serving never imports pyarrow."""

__all__ = [
    "DEFAULT_EVENT_WEIGHTS",
    "MAX_K",
    "Candidate",
    "CandidateSet",
    "Deadline",
    "ItemId",
    "Request",
    "SourceReport",
    "SourceStatus",
    "UserId",
    "as_id_array",
    "event_weight_vector",
]


def as_id_array(ids: Sequence[ItemId] | npt.NDArray[Any], what: str = "ids") -> npt.NDArray[Any]:
    """Ids as a numpy array: int64 for integer ids, unicode for string ids.

    The one id rule (:func:`retrieval.ids.id_array`, of which this is an alias): one canonical
    dtype per id kind lets the blender merge lists with vectorised set operations; bools,
    floats, None, empty strings, ids beyond int64 and ints mixed with non-numeric strings raise
    :class:`retrieval.errors.IdError` (a ``ValueError``) naming ``what``.
    """
    return id_array(ids, what)


@dataclass(frozen=True, slots=True)
class Request:
    """Everything a source may use to find candidates for one user.

    History is oldest first. Sources never mutate a request; the retriever fills in history from
    its store when the caller passes none.
    """

    user_id: UserId | None = None
    history: tuple[ItemId, ...] = ()
    history_timestamps: tuple[float, ...] | None = None
    history_event_types: tuple[str, ...] | None = None
    seed_items: tuple[ItemId, ...] = ()
    context: Mapping[str, str] = field(default_factory=dict)
    exclude: frozenset[ItemId] = frozenset()
    k: int | None = None
    deadline_ms: float | None = None
    vector: npt.NDArray[np.float32] | None = None
    live_popular: Mapping[str | None, tuple[Sequence[ItemId], Sequence[float]]] | None = None
    """Live popular lists by segment key (``None`` = global, ``"country=de"``), read by the
    retriever in its one store round trip; ``None`` when the store was not read."""
    _history_ids: npt.NDArray[Any] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def history_ids(self) -> npt.NDArray[Any]:
        """``history`` as one array to look up (``lookup_ids``), made once per request: every
        history-driven source reads it, and converting the tuple cost more than their sums."""
        got = self._history_ids
        if got is None:  # racing threads compute the same array; either may be kept
            got = lookup_ids(self.history, "request.history")
            object.__setattr__(self, "_history_ids", got)
        return got

    def __post_init__(self) -> None:
        n = len(self.history)
        if self.history_timestamps is not None and len(self.history_timestamps) != n:
            raise InputError(
                f"history_timestamps has {len(self.history_timestamps)} entries, history has {n}"
            )
        if self.history_event_types is not None and len(self.history_event_types) != n:
            raise InputError(
                f"history_event_types has {len(self.history_event_types)} entries, history has {n}"
            )
        if self.k is not None and self.k < 1:
            raise InputError(f"k must be >= 1, got {self.k}")
        if self.deadline_ms is not None and not self.deadline_ms > 0:
            raise InputError(f"deadline_ms must be > 0, got {self.deadline_ms}")


class Deadline:
    """A point in monotonic time; sources ask it how long they have left."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at

    @classmethod
    def in_ms(cls, ms: float) -> Deadline:
        """The deadline ``ms`` milliseconds from now on the monotonic clock (wall-clock jumps
        cannot move it)."""
        return cls(time.monotonic() + ms / 1000.0)

    def remaining_ms(self) -> float:
        """Milliseconds left; negative once passed (clamp before using it as a timeout)."""
        return (self.at - time.monotonic()) * 1000.0

    def expired(self) -> bool:
        """Whether the deadline has passed: the cheap check a source's loop makes to stop early."""
        return time.monotonic() >= self.at

    def earlier(self, other: Deadline) -> Deadline:
        """The tighter of the two, so a per-source timeout never outlives the blend's deadline."""
        return self if self.at <= other.at else other

    def __repr__(self) -> str:
        return f"Deadline(remaining_ms={self.remaining_ms():.2f})"


class SourceStatus(StrEnum):
    """How one source's call for one request ended (:attr:`SourceReport.status`).

    Only ``ok`` contributed candidates. Only ``error``, and a ``timeout`` that had a fair share
    of its budget, count against the source's circuit breaker; ``skipped``, ``shed`` and
    ``circuit_open`` are not the source's own failure. A result whose every report is ``ok``
    or ``skipped`` is complete (the only kind the result cache keeps).
    """

    OK = "ok"
    """Answered in time and passed the contract check; its list (possibly empty) was merged."""
    TIMEOUT = "timeout"
    """Started, but no answer by its deadline (its own timeout or the blend's): abandoned,
    not waited for."""
    ERROR = "error"
    """Raised, or answered in breach of the contract: dropped for this source alone (the blend
    fails only when the source is ``required``)."""
    SKIPPED = "skipped"
    """Could not serve this request (a need unmet, e.g. no history, or it raised
    ``SkipSource``): a normal outcome, not a failure."""
    CIRCUIT_OPEN = "circuit_open"
    """Not asked: its breaker is open after repeated failures (or another request holds the
    half-open probe)."""
    SHED = "shed"
    """Not run: the source's calls in flight were at their cap, or it could not start in time."""


@dataclass(slots=True)
class SourceReport:
    """What one source did for one request: the blend's audit trail and the metrics' input."""

    name: str
    status: SourceStatus
    latency_ms: float = 0.0
    returned: int = 0
    survived: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the status as its string value, latency in ms rounded to microseconds."""
        return {
            "name": self.name,
            "status": self.status.value,
            "latency_ms": round(self.latency_ms, 3),
            "returned": self.returned,
            "survived": self.survived,
            "error": self.error,
        }


class Candidate(NamedTuple):
    """A light view of one row of a CandidateSet, built only when iterated."""

    item_id: ItemId
    score: float
    sources: tuple[str, ...]
    ranks: dict[str, int]


@dataclass(slots=True)
class CandidateSet:
    """The blend's result, column by column.

    ``ranks[i, j]`` is the 0-based rank candidate ``i`` had in source ``source_names[j]``, or -1
    when that source did not return it: provenance for 1,000 candidates is one int32 matrix.
    """

    item_ids: npt.NDArray[Any]
    scores: npt.NDArray[np.float32]
    source_names: tuple[str, ...]
    ranks: npt.NDArray[np.int32]
    reports: tuple[SourceReport, ...]
    elapsed_ms: float = 0.0
    store_status: str = "ok"
    cache_hit: bool = False
    backfilled: int = 0
    filtered: int = 0
    """Distinct candidates the filters removed (seen, excluded, blocked) before the cut to k."""
    arm: str | None = None
    """The A/B arm that served the request (``arms`` in the config), None without arms."""

    @classmethod
    def empty(
        cls, source_names: tuple[str, ...], reports: tuple[SourceReport, ...]
    ) -> CandidateSet:
        """A result with no candidates but every source's report: the shape is the same as a
        full one (ranks has one column per source), so callers need no special case."""
        return cls(
            item_ids=np.empty(0, dtype=np.int64),
            scores=np.empty(0, dtype=np.float32),
            source_names=source_names,
            ranks=np.empty((0, len(source_names)), dtype=np.int32),
            reports=reports,
        )

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])

    def __iter__(self) -> Iterator[Candidate]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, i: int) -> Candidate:
        row = self.ranks[i]
        hit = np.flatnonzero(row >= 0)
        names = tuple(self.source_names[j] for j in hit)
        return Candidate(
            item_id=self.item_ids[i].item(),
            score=float(self.scores[i]),
            sources=names,
            ranks={self.source_names[j]: int(row[j]) for j in hit},
        )

    def sources_of(self, i: int) -> tuple[str, ...]:
        """The names of the sources that returned candidate ``i``, in ``source_names`` order
        (a backfilled candidate names the fallback)."""
        return self[i].sources

    def from_source(self, name: str) -> npt.NDArray[np.bool_]:
        """Mask of the candidates that ``name`` returned."""
        j = self.source_names.index(name)
        return self.ranks[:, j] >= 0

    def report(self, name: str) -> SourceReport:
        """Source ``name``'s report for this request; KeyError (listing the names) if there
        is no such source."""
        for r in self.reports:
            if r.name == name:
                return r
        raise KeyError(f"no source named {name!r}; sources: {', '.join(self.source_names)}")

    def to_dict(self, with_candidates: bool = True) -> dict[str, Any]:
        """JSON-ready: counts, timings (ms), store status and reports, plus each candidate's
        id, score and per-source ranks unless ``with_candidates`` is False (a cheap summary)."""
        out: dict[str, Any] = {
            "count": len(self),
            "elapsed_ms": round(self.elapsed_ms, 3),
            "store": self.store_status,
            "cache_hit": self.cache_hit,
            "backfilled": self.backfilled,
            "filtered": self.filtered,
            "arm": self.arm,
            "reports": [r.to_dict() for r in self.reports],
        }
        if with_candidates:
            out["candidates"] = [
                {"item_id": c.item_id, "score": round(c.score, 6), "ranks": c.ranks} for c in self
            ]
        return out

    def to_json(self, with_candidates: bool = True) -> str:
        """:meth:`to_dict` as one line of JSON (what the CLI prints with ``--json``)."""
        return json.dumps(self.to_dict(with_candidates))


class WeightedEvents(Protocol):
    """What :func:`event_weight_vector` reads of an event log (``retrieval.offline.events``)."""

    @property
    def weights(self) -> npt.NDArray[Any]:
        """Each event's own weight (1 when the log has no weight column), one per event."""
        ...

    @property
    def event_types(self) -> npt.NDArray[Any] | None:
        """Each event's type as a code into ``event_type_names``; None when the log has no
        event types (every event then weighs its ``weights`` alone)."""
        ...

    @property
    def event_type_names(self) -> Sequence[str]:
        """The type names the codes of ``event_types`` index."""
        ...


def event_weight_vector(
    events: WeightedEvents, event_weights: Mapping[str, float]
) -> npt.NDArray[np.float64]:
    """Each event's weight: its ``weight`` column times its type's weight (unknown types: 1).

    One definition for every builder, so "a cart counts three clicks" means the same everywhere.
    """
    w = np.asarray(events.weights, dtype=np.float64)
    if events.event_types is not None and len(events.event_type_names):
        per_type = np.array(
            [float(event_weights.get(n, 1.0)) for n in events.event_type_names], dtype=np.float64
        )
        w = w * per_type[events.event_types]
    return w
