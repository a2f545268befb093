"""The online store's contract: the ``Store`` protocol, the ``Event`` it records and the checks
every backend applies before writing (one rule for memory and Redis)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from retrieval.errors import InputError, StoreError
from retrieval.ids import INT64_MAX, INT64_MIN, check_id
from retrieval.types import ItemId, UserId
from sources.base import StoreView

__all__ = [
    "Event",
    "Store",
    "StoreRead",
    "StoreUnavailable",
    "check_events",
    "check_timestamp",
]

RESCALE_HALF_LIVES = 64  # counters are rescaled before weights pass 2**64: far from overflow
_SWEEP_EVERY = 4096  # records between sweeps of expired histories
EARLIEST_TIMESTAMP = 946_684_800.0  # 2000-01-01T00:00:00Z: older "seconds" are a unit mistake
FUTURE_SLACK_S = 86_400.0  # clock skew allowed for an event from the future


def check_timestamp(value: Any, what: str = "timestamp", now: float | None = None) -> float:
    """Seconds since the epoch as a float, between 2000-01-01 and one day from now.

    Anything else raises :class:`InputError` naming ``what``: a millisecond timestamp would
    otherwise weigh ``2**(1000 * age / half_life)`` and zero every other live counter.
    """
    latest = (time.time() if now is None else now) + FUTURE_SLACK_S
    if type(value) is float and EARLIEST_TIMESTAMP <= value <= latest:
        return value  # the common case, first
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise InputError(
            f"{what}: must be seconds since the epoch (a number), got {value!r:.60} "
            f"({type(value).__name__})"
        )
    try:
        ts = float(value)
    except OverflowError:
        ts = math.inf
    if not math.isfinite(ts):
        raise InputError(f"{what}: must be finite seconds since the epoch, got {value!r:.60}")
    if EARLIEST_TIMESTAMP <= ts <= latest:
        return ts
    hint = ""
    for factor, unit in ((1e3, "milliseconds"), (1e6, "microseconds"), (1e9, "nanoseconds")):
        if EARLIEST_TIMESTAMP <= ts / factor <= latest:
            hint = f" ({unit}?)"
            break
    raise InputError(
        f"{what}: must be seconds since the epoch, got {value!r:.60}{hint}; accepted: "
        "2000-01-01 to one day from now"
    )


def _check_fields(
    user_id: Any,
    item_id: Any,
    timestamp: Any,
    event_type: Any,
    context: Any,
    where: str,
    now: float,
) -> tuple[UserId, ItemId, float, str, Mapping[str, str] | None]:
    """One event's fields validated and normalised (numpy ints become ints), or InputError
    (IdError for an id) naming ``where`` and the field. Fields already valid come back as the
    very same objects."""
    user = user_id if _plain_id(user_id) else check_id(user_id, f"{where}.user_id")
    item = item_id if _plain_id(item_id) else check_id(item_id, f"{where}.item_id")
    ts = check_timestamp(timestamp, f"{where}.timestamp", now)
    if type(event_type) is not str or not event_type:
        raise InputError(f"{where}.event_type: must be a non-empty string, got {event_type!r}")
    for name, text in (("user_id", user), ("item_id", item), ("event_type", event_type)):
        if type(text) is str and len(text) > MAX_TEXT_CHARS:
            raise InputError(
                f"{where}.{name}: {len(text)} characters, more than {MAX_TEXT_CHARS}: "
                "ids and event types are keys, not documents"
            )
    if context is None:
        return user, item, ts, event_type, None
    if type(context) is dict and all(
        type(k) is str and k and type(v) is str for k, v in context.items()
    ):
        return user, item, ts, event_type, context
    if not isinstance(context, Mapping):
        raise InputError(
            f"{where}.context: must be a mapping of segment to value, got {type(context).__name__}"
        )
    ctx: dict[str, str] = {}
    for key, value in context.items():
        if not isinstance(key, str) or not key:
            raise InputError(f"{where}.context: keys must be non-empty strings, got {key!r}")
        if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
            value = str(int(value))
        if not isinstance(value, str):
            raise InputError(
                f"{where}.context[{key!r}]: must be a string (or int), got {value!r:.60}"
            )
        ctx[key] = value
    return user, item, ts, event_type, ctx


MAX_TEXT_CHARS = 1024
"""The longest id or event type ``record()`` takes: it bounds every value the stores write, so
anything much longer read back is foreign (and skipped without being parsed)."""


def _plain_id(value: Any) -> bool:
    """A valid id of the exact type it is stored as (the fast path; ``check_id`` does the rest)."""
    t = type(value)
    return (t is str and value != "") or (t is int and INT64_MIN <= value <= INT64_MAX)


_FIELDS = ("user_id", "item_id", "timestamp", "event_type", "context")


@dataclass(frozen=True, slots=True)
class Event:
    """One live event. Validated when made: ids by the one id rule (``retrieval.ids``; numpy
    ints become ints), ``timestamp`` in seconds since the epoch (see ``check_timestamp``),
    ``event_type`` a non-empty string, ``context`` string segment values (ints are spelled as
    text). A bad field raises :class:`InputError` (:class:`IdError` for an id) naming it."""

    user_id: UserId
    item_id: ItemId
    timestamp: float
    event_type: str = "click"
    context: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        values = _check_fields(
            self.user_id,
            self.item_id,
            self.timestamp,
            self.event_type,
            self.context,
            "Event",
            time.time(),
        )
        for name, value in zip(_FIELDS, values, strict=True):
            object.__setattr__(self, name, value)


def check_events(events: Iterable[Any]) -> list[Event]:
    """Every event of a batch validated before any is written: the first bad one raises
    :class:`InputError` naming its index and field (``events[3].timestamp: ...``)."""
    now = time.time()
    out: list[Event] = []
    for i, ev in enumerate(events):
        where = f"events[{i}]"
        try:
            fields = (ev.user_id, ev.item_id, ev.timestamp, ev.event_type, ev.context)
        except AttributeError:
            raise InputError(f"{where}: expected an Event, got {type(ev).__name__}") from None
        # An Event was checked when made; check again: objects can be forged or duck-typed.
        values = _check_fields(*fields, where, now)
        same = (
            type(ev) is Event
            and values[0] is fields[0]
            and values[1] is fields[1]
            and values[2] is fields[2]
            and values[4] is fields[4]
        )
        out.append(ev if same else Event(*values))
    return out


class StoreUnavailable(StoreError):
    """The store could not take a write: raised instead of losing events silently."""


@dataclass(frozen=True, slots=True)
class StoreRead:
    """One hot-path read: the user's history (oldest first) and the popular list per segment.

    ``ok`` is False when the read failed or found unreadable values: what it holds is usable
    but possibly incomplete, and the blend is reported ``degraded``.
    """

    items: list[ItemId] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    event_types: list[str] = field(default_factory=list)
    popular: dict[str | None, tuple[list[ItemId], list[float]]] = field(default_factory=dict)
    ok: bool = True


class Store(StoreView, Protocol):
    """What the retriever and the sources need from online state: the sources' ``StoreView``
    (``history``, ``popular``), declared once there, and the rest the retriever uses.

    Reads (``fetch``, ``history``, ``popular``, ``cache_get``) never raise. ``record`` checks
    the whole batch first (``check_events``): a bad event raises ``InputError`` naming its index
    and field, and nothing of that batch is written. It raises ``StoreError``
    (``StoreUnavailable`` when the store is unreachable) when the events cannot be kept.
    """

    def record(self, events: list[Event]) -> None:
        """Add ``events`` to their users' histories and to the live popularity counters.

        Each event goes to its user's history (newest kept, at most ``history_len`` per user,
        expiring ``history_ttl_s`` after the user's last event when that is set) and adds its
        type's weight, decayed with ``half_life_s``, to the global counter and to one counter per
        ``context`` segment (``country=DE``). The whole batch is checked first
        (``check_events``): a bad event raises ``InputError`` and nothing is written. Raises
        ``StoreError`` (``StoreUnavailable`` when the store is unreachable) when the events
        cannot be kept; a store that buffers them returns instead and sends them later.
        Thread-safe.
        """
        ...

    def fetch(
        self,
        user_id: UserId | None,
        segments: Sequence[str | None] = (None,),
        *,
        history_limit: int | None = None,
        popular_limit: int = 100,
        timeout_ms: float | None = None,
    ) -> StoreRead:
        """The hot-path read: everything a blend needs from the store, in one round trip.

        ``user_id``'s newest ``history_limit`` events (``None``: up to ``history_len``; 0, or no
        ``user_id``, skips the history), oldest first, and the top ``popular_limit`` items of
        each live popular list in ``segments`` (``None`` is the global list, ``country=DE`` a
        segment's; 0 skips them), with their weights decayed to now. ``timeout_ms`` is the time
        the caller can give it (what is left before its deadline; ``None``: the store's own
        timeout). Never raises: a failed, late or unreadable read returns what it could read
        with ``ok=False``, and ``status()`` turns ``"degraded"``.
        """
        ...

    def cache_get(self, key: str, *, timeout_ms: float | None = None) -> bytes | None:
        """The cached blend result stored under ``key``, or None when there is none, it
        expired, or the store failed (the caller then blends). Never raises."""
        ...

    def cache_set(
        self, key: str, value: bytes, ttl_s: float, *, timeout_ms: float | None = None
    ) -> bool:
        """Keep ``value`` under ``key`` for ``ttl_s`` seconds (a store may evict it sooner);
        False when the store could not take it. Never raises."""
        ...

    def status(self) -> str:
        """``"ok"``, or ``"degraded"`` after a failed or unreadable round trip, until the next
        one that succeeds: what a blend reports as its ``store_status``."""
        ...

    def close(self) -> None:
        """Release the store's connections; a store that buffers events tries once to send
        them first. Calling it twice is harmless."""
        ...
