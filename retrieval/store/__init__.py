"""Online state behind one protocol: the embedded store (default) and Redis (``[redis]`` extra,
``retrieval.store.redis_store``, imported only when configured)."""

from retrieval.store.base import (
    Event,
    Store,
    StoreRead,
    StoreUnavailable,
    check_events,
    check_timestamp,
)
from retrieval.store.memory import MemoryStore

__all__ = [
    "Event",
    "MemoryStore",
    "Store",
    "StoreRead",
    "StoreUnavailable",
    "check_events",
    "check_timestamp",
]
