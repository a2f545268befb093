"""The embedded store: live user history and decayed popularity counters in one process."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence

import numpy as np

from retrieval.store.base import (
    _SWEEP_EVERY,
    RESCALE_HALF_LIVES,
    Event,
    StoreRead,
    check_events,
)
from retrieval.types import DEFAULT_EVENT_WEIGHTS, ItemId, UserId

__all__ = ["MemoryStore"]


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
        """The user's newest ``limit`` events (None: all kept), oldest first; ``timeout_ms`` is
        accepted for the ``Store`` protocol and unused (nothing here waits on I/O)."""
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
        """The value kept under ``key``, or None when there is none or it expired."""
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
        """Always ``"ok"``: nothing in one process can be unreachable."""
        return "ok"

    def close(self) -> None:
        """Nothing to release: the state is garbage-collected with the store."""
