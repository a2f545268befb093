"""The online store: live user history and real-time popularity counters.

The embedded in-memory store is the default for one process; a Redis store with the same
behaviour shares the state between processes and hosts.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from retrieval.types import ItemId, UserId

__all__ = ["Event", "MemoryStore", "Store"]


@dataclass(frozen=True, slots=True)
class Event:
    user_id: UserId
    item_id: ItemId
    timestamp: float
    event_type: str = "click"
    context: Mapping[str, str] | None = None


class Store(Protocol):
    """What the retriever and the sources need from online state."""

    def record(self, events: list[Event]) -> None: ...

    def history(
        self, user_id: UserId, limit: int | None = None
    ) -> tuple[list[ItemId], list[float], list[str]]: ...

    def popular(self, segment: str | None, limit: int) -> tuple[list[ItemId], list[float]]: ...

    def status(self) -> str: ...

    def close(self) -> None: ...


class MemoryStore:
    """Thread-safe, per-process: capped history per user and decayed popularity counters.

    Counters decay with ``half_life_s``: each event adds ``w * 2**((t - t0) / half_life_s)`` to a
    running sum, so comparing two items never needs a rescan. A segment key looks like
    ``country=de``; ``None`` is the global counter.
    """

    def __init__(
        self,
        history_len: int = 200,
        half_life_s: float = 86_400.0,
        event_weights: Mapping[str, float] | None = None,
    ) -> None:
        self.history_len = history_len
        self.half_life_s = half_life_s
        self.event_weights = dict(event_weights or {"click": 1.0, "cart": 3.0, "order": 6.0})
        self._lock = threading.Lock()
        self._history: dict[UserId, deque[tuple[ItemId, float, str]]] = {}
        self._counts: dict[str | None, dict[ItemId, float]] = {}
        self._t0 = time.time()

    def record(self, events: list[Event]) -> None:
        with self._lock:
            for ev in events:
                if self.history_len:
                    h = self._history.get(ev.user_id)
                    if h is None:
                        h = self._history[ev.user_id] = deque(maxlen=self.history_len)
                    h.append((ev.item_id, ev.timestamp, ev.event_type))
                boost = self.event_weights.get(ev.event_type, 1.0) * math.exp2(
                    (ev.timestamp - self._t0) / self.half_life_s
                )
                keys: list[str | None] = [None]
                if ev.context:
                    keys += [f"{k}={v}" for k, v in ev.context.items()]
                for key in keys:
                    counts = self._counts.setdefault(key, {})
                    counts[ev.item_id] = counts.get(ev.item_id, 0.0) + boost

    def history(
        self, user_id: UserId, limit: int | None = None
    ) -> tuple[list[ItemId], list[float], list[str]]:
        with self._lock:
            h = self._history.get(user_id)
            rows = list(h) if h else []
        if limit is not None:
            rows = rows[-limit:] if limit > 0 else []
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    def popular(self, segment: str | None, limit: int) -> tuple[list[ItemId], list[float]]:
        """Live top items with their decayed weight as of now."""
        with self._lock:
            counts = self._counts.get(segment)
            if not counts:
                return [], []
            items = list(counts)
            values = np.fromiter(counts.values(), dtype=np.float64, count=len(items))
        scale = math.exp2(-(time.time() - self._t0) / self.half_life_s)
        top = np.argsort(-values, kind="stable")[:limit]
        return [items[i] for i in top], (values[top] * scale).tolist()

    def status(self) -> str:
        return "ok"

    def close(self) -> None:
        pass
