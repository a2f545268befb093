"""The online store: live user history and real-time popularity counters.

The embedded in-memory store is the default for one process; a Redis store with the same
behaviour shares the state between processes and hosts.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from retrieval.errors import InputError, StoreError
from retrieval.ids import INT64_MAX, INT64_MIN, check_id
from retrieval.types import DEFAULT_EVENT_WEIGHTS, ItemId, UserId

__all__ = [
    "Event",
    "MemoryStore",
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


class Store(Protocol):
    """What the retriever and the sources need from online state.

    Reads (``fetch``, ``history``, ``popular``, ``cache_get``) never raise. ``record`` checks
    the whole batch first (``check_events``): a bad event raises ``InputError`` naming its index
    and field, and nothing of that batch is written. It raises ``StoreError``
    (``StoreUnavailable`` when the store is unreachable) when the events cannot be kept.
    """

    def record(self, events: list[Event]) -> None: ...

    def fetch(
        self,
        user_id: UserId | None,
        segments: Sequence[str | None] = (None,),
        *,
        history_limit: int | None = None,
        popular_limit: int = 100,
        timeout_ms: float | None = None,
    ) -> StoreRead: ...

    def history(
        self, user_id: UserId, limit: int | None = None
    ) -> tuple[list[ItemId], list[float], list[str]]: ...

    def popular(self, segment: str | None, limit: int) -> tuple[list[ItemId], list[float]]: ...

    def cache_get(self, key: str, *, timeout_ms: float | None = None) -> bytes | None: ...

    def cache_set(
        self, key: str, value: bytes, ttl_s: float, *, timeout_ms: float | None = None
    ) -> bool: ...

    def status(self) -> str: ...

    def close(self) -> None: ...


class MemoryStore:
    """Thread-safe, per-process: capped history per user and decayed popularity counters.

    Counters decay with ``half_life_s``: each event adds ``w * 2**((t - t0) / half_life_s)`` to a
    running sum, so comparing two items never needs a rescan. Before those weights could
    overflow (1,024 half-lives after ``t0``), every counter is scaled down once and ``t0`` moves
    forward by ``RESCALE_HALF_LIVES`` half-lives: one pass every 64 half-lives, the memory twin of
    the Redis store's eras. A segment key looks like ``country=de``; ``None`` is the global
    counter. A history expires ``history_ttl_s`` after its last event, as Redis's EXPIRE does.
    ``event_weights`` (default ``DEFAULT_EVENT_WEIGHTS``; unknown types weigh 1) is what one
    event of each type adds to the counters.
    """

    def __init__(
        self,
        history_len: int = 200,
        half_life_s: float = 86_400.0,
        event_weights: Mapping[str, float] | None = None,
        history_ttl_s: float | None = None,
        cache_entries: int = 10_000,
    ) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        if history_ttl_s is not None and not history_ttl_s > 0:
            raise ValueError(f"history_ttl_s must be > 0 or None, got {history_ttl_s}")
        self.history_len = history_len
        self.half_life_s = half_life_s
        self.history_ttl_s = history_ttl_s
        self.event_weights = dict(DEFAULT_EVENT_WEIGHTS if event_weights is None else event_weights)
        self._lock = threading.Lock()
        self._history: dict[UserId, deque[tuple[ItemId, float, str]]] = {}
        self._expires: dict[UserId, float] = {}  # monotonic expiry per user (with a TTL only)
        self._counts: dict[str | None, dict[ItemId, float]] = {}
        self._t0 = time.time()
        self._since_sweep = 0
        self._cache: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._cache_entries = cache_entries

    def record(self, events: list[Event]) -> None:
        """Append events to histories and counters; InputError for a bad event (nothing of the
        batch is written then)."""
        events = check_events(events)
        with self._lock:
            now = time.monotonic()
            for ev in events:
                if self.history_len:
                    h = self._history.get(ev.user_id)
                    if h is None or self._expired(ev.user_id, now):
                        h = self._history[ev.user_id] = deque(maxlen=self.history_len)
                    h.append((ev.item_id, ev.timestamp, ev.event_type))
                    if self.history_ttl_s is not None:
                        self._expires[ev.user_id] = now + self.history_ttl_s
                exponent = (ev.timestamp - self._t0) / self.half_life_s
                if exponent > RESCALE_HALF_LIVES:
                    self._rescale(math.floor(exponent))
                    exponent = (ev.timestamp - self._t0) / self.half_life_s
                boost = self.event_weights.get(ev.event_type, 1.0) * math.exp2(exponent)
                keys: list[str | None] = [None]
                if ev.context:
                    keys += [f"{k}={v}" for k, v in ev.context.items()]
                for key in keys:
                    counts = self._counts.setdefault(key, {})
                    counts[ev.item_id] = counts.get(ev.item_id, 0.0) + boost
            self._since_sweep += len(events)
            if self._expires and self._since_sweep >= _SWEEP_EVERY:
                self._sweep(now)

    def _rescale(self, half_lives: int) -> None:
        """Move ``t0`` forward and scale every counter to match (caller holds the lock)."""
        factor = math.exp2(-half_lives)
        for counts in self._counts.values():
            for item in counts:
                counts[item] *= factor
        self._t0 += half_lives * self.half_life_s

    def _expired(self, user_id: UserId, now: float) -> bool:
        at = self._expires.get(user_id)
        return at is not None and at <= now

    def _sweep(self, now: float) -> None:
        """Forget expired histories so idle users do not hold memory (caller holds the lock)."""
        self._since_sweep = 0
        for user in [u for u, at in self._expires.items() if at <= now]:
            del self._expires[user]
            self._history.pop(user, None)

    def history(
        self, user_id: UserId, limit: int | None = None, *, timeout_ms: float | None = None
    ) -> tuple[list[ItemId], list[float], list[str]]:
        if limit is not None and limit <= 0:
            return [], [], []
        with self._lock:
            if self._expired(user_id, time.monotonic()):
                del self._expires[user_id]
                self._history.pop(user_id, None)
            h = self._history.get(user_id)
            rows = list(h) if h else []
        if limit is not None:
            rows = rows[-limit:]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    def popular(
        self, segment: str | None, limit: int, *, timeout_ms: float | None = None
    ) -> tuple[list[ItemId], list[float]]:
        """Live top items with their decayed weight as of now."""
        if limit <= 0:
            return [], []
        with self._lock:
            counts = self._counts.get(segment)
            if not counts:
                return [], []
            items = list(counts)
            values = np.fromiter(counts.values(), dtype=np.float64, count=len(items))
            t0 = self._t0
        # Future-dated events can put t0 ahead of now: np.exp2 saturates instead of raising.
        with np.errstate(over="ignore"):
            scale = np.exp2(-(time.time() - t0) / self.half_life_s)
        if limit < values.size:  # O(n) selection, then sort only the few kept
            kth = np.partition(values, values.size - limit)[values.size - limit]
            top = np.flatnonzero(values >= kth)  # ties on the cut: first recorded wins, as in
            top = top[np.lexsort((top, -values[top]))][:limit]  # a full stable sort
        else:
            top = np.argsort(-values, kind="stable")
        with np.errstate(over="ignore", invalid="ignore"):
            scores = np.nan_to_num(values[top] * scale, posinf=np.finfo(np.float64).max)
        return [items[i] for i in top.tolist()], scores.tolist()

    def fetch(
        self,
        user_id: UserId | None,
        segments: Sequence[str | None] = (None,),
        *,
        history_limit: int | None = None,
        popular_limit: int = 100,
        timeout_ms: float | None = None,
    ) -> StoreRead:
        """History and popular lists in one call: the same contract as ``RedisStore.fetch``."""
        items: list[ItemId] = []
        stamps: list[float] = []
        types: list[str] = []
        if user_id is not None and (history_limit is None or history_limit > 0):
            items, stamps, types = self.history(user_id, history_limit)
        popular: dict[str | None, tuple[list[ItemId], list[float]]] = {}
        if popular_limit > 0:
            for seg in dict.fromkeys(segments):
                popular[seg] = self.popular(seg, popular_limit)
        return StoreRead(items, stamps, types, popular)

    def cache_get(self, key: str, *, timeout_ms: float | None = None) -> bytes | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                return None
            if hit[0] <= time.monotonic():
                del self._cache[key]
                return None
            return hit[1]

    def cache_set(
        self, key: str, value: bytes, ttl_s: float, *, timeout_ms: float | None = None
    ) -> bool:
        """Keep ``value`` for ``ttl_s``; the oldest entries go beyond ``cache_entries``."""
        with self._lock:
            self._cache[key] = (time.monotonic() + ttl_s, bytes(value))
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        return True

    def status(self) -> str:
        return "ok"

    def close(self) -> None:
        pass
