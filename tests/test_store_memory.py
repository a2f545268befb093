"""The shared store behaviour on the embedded MemoryStore."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from retrieval.store import Event, MemoryStore
from retrieval.store.base import RESCALE_HALF_LIVES
from tests.store_suite import StoreSuite


class TestMemoryStore(StoreSuite):
    supports_history_ttl = True

    def make_store(self, **params: Any) -> MemoryStore:
        return MemoryStore(**params)


def test_counters_never_overflow_over_thousands_of_half_lives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """exp2 overflows past 1,024 half-lives from t0: t0 must move forward instead."""
    import retrieval.store.memory as mod

    hl = 1.0
    store = MemoryStore(half_life_s=hl)
    t0 = time.time()
    store.record([Event("u", "old", t0, "order")])
    late = t0 + 5_000 * hl  # far beyond float range without a rescale
    monkeypatch.setattr(mod.time, "time", lambda: late)
    store.record([Event("u", "new", late)])
    with store._lock:
        assert all(math.isfinite(v) for c in store._counts.values() for v in c.values())
        assert store._t0 > t0 + 4_000 * hl
        assert store._counts[None]["new"] <= 2.0**RESCALE_HALF_LIVES
    ids, scores = store.popular(None, 10)
    assert ids[0] == "new" and all(math.isfinite(s) for s in scores)


def test_rescale_keeps_the_ratio_between_counters() -> None:
    store = MemoryStore(half_life_s=10.0)
    t = time.time()
    store.record([Event("u", "a", t, "order"), Event("u", "b", t)])
    store.record([Event("u", "c", t + 10.0 * (RESCALE_HALF_LIVES + 3))])  # forces one rescale
    got = dict(zip(*store.popular(None, 10), strict=True))
    assert got["a"] / got["b"] == pytest.approx(6.0, rel=1e-9)


def test_expired_histories_are_swept() -> None:
    store = MemoryStore(history_ttl_s=0.05)
    store.record([Event(f"u{i}", 1, time.time()) for i in range(100)])
    time.sleep(0.08)
    store.record([Event("x", 1, time.time()) for _ in range(5_000)])  # triggers a sweep
    assert set(store._history) == {"x"}


def test_memory_result_cache_expires_and_is_bounded() -> None:
    store = MemoryStore(cache_entries=2)
    store.cache_set("a", b"1", ttl_s=0.05)
    store.cache_set("b", b"2", ttl_s=10)
    store.cache_set("c", b"3", ttl_s=10)  # evicts "a", the oldest
    assert store.cache_get("a") is None and store.cache_get("c") == b"3"
    store.cache_set("d", b"4", ttl_s=0.01)
    time.sleep(0.03)
    assert store.cache_get("d") is None
