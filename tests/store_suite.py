"""The behaviour every store backend shares, run against each one.

Subclass ``StoreSuite`` and implement ``make_store(**params)`` (params: ``history_len``,
``half_life_s``, ``event_weights`` and, when ``supports_history_ttl``, ``history_ttl_s``); every
store it makes is closed after the test.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from retrieval.errors import IdError, InputError
from retrieval.store import Event, Store
from retrieval.types import DEFAULT_EVENT_WEIGHTS

HOUR = 3_600.0


@dataclass
class RawEvent:
    """An event ``Event``'s own checks never saw (a caller's own type, or a forged Event):
    what ``record()`` must validate by itself."""

    user_id: Any
    item_id: Any
    timestamp: Any
    event_type: Any = "click"
    context: Any = None


BAD_IDS = [None, True, np.bool_(False), 1.5, float("nan"), 2**63, "", b"bytes"]


class StoreSuite:
    supports_history_ttl = False

    def make_store(self, **params: Any) -> Store:  # pragma: no cover - abstract
        raise NotImplementedError

    @pytest.fixture
    def new_store(self) -> Iterator[Any]:
        made: list[Store] = []

        def factory(**params: Any) -> Store:
            s = self.make_store(**params)
            made.append(s)
            return s

        yield factory
        for s in made:
            s.close()

    @pytest.fixture
    def store(self, new_store: Any) -> Store:
        return new_store()

    # -- history --------------------------------------------------------------------------

    def test_history_is_oldest_first_and_honours_limit(self, store: Store) -> None:
        now = time.time()
        store.record([Event("u1", i, now - 10 + i) for i in range(5)])
        items, stamps, types = store.history("u1")
        assert items == [0, 1, 2, 3, 4]
        assert stamps == [now - 10 + i for i in range(5)]
        assert types == ["click"] * 5
        assert store.history("u1", limit=2)[0] == [3, 4]
        assert store.history("u1", limit=0) == ([], [], [])
        assert store.history("u1", limit=50)[0] == [0, 1, 2, 3, 4]
        assert store.history("nobody") == ([], [], [])
        assert store.status() == "ok"

    def test_history_is_capped(self, new_store: Any) -> None:
        store = new_store(history_len=3)
        now = time.time()
        for i in range(5):
            store.record([Event(7, f"i{i}", now + i)])
        assert store.history(7)[0] == ["i2", "i3", "i4"]

    def test_zero_history_len_keeps_counters_only(self, new_store: Any) -> None:
        store = new_store(history_len=0)
        store.record([Event("u", "a", time.time())])
        assert store.history("u") == ([], [], [])
        assert store.popular(None, 5)[0] == ["a"]

    def test_int_and_str_ids_keep_their_type(self, store: Store) -> None:
        now = time.time()
        ids: list[int | str] = [1, "1", "sku-\u00fc \u2603", 2**40, " ", "a,b]", -(2**63)]
        store.record([Event("u", item, now + i) for i, item in enumerate(ids)])
        items, _, _ = store.history("u")
        assert items == ids
        assert [type(x) for x in items] == [type(x) for x in ids]
        top, _ = store.popular(None, 100)
        assert sorted(map(repr, top)) == sorted(map(repr, ids))

    def test_event_types_and_timestamps_round_trip(self, store: Store) -> None:
        stamps = [1_764_000_000.123456, 1_764_000_001.5, 1_764_000_002.0]
        types = ["click", "cart", "some-new-type"]
        store.record([Event(3, 9, t, e) for t, e in zip(stamps, types, strict=True)])
        _, got_stamps, got_types = store.history(3)
        assert got_stamps == stamps
        assert got_types == types

    def test_batched_record_equals_single_records(self, new_store: Any) -> None:
        now = time.time()
        events = [
            Event(f"u{i % 3}", i % 7, now - i, ("click", "cart", "order")[i % 3], {"c": str(i % 2)})
            for i in range(60)
        ]
        one, many = new_store(), new_store()
        one.record(events)
        for ev in events:
            many.record([ev])
        for user in ("u0", "u1", "u2"):
            assert one.history(user) == many.history(user)
        for seg in (None, "c=0", "c=1"):
            ids_a, scores_a = one.popular(seg, 10)
            ids_b, scores_b = many.popular(seg, 10)
            assert ids_a == ids_b
            assert scores_a == pytest.approx(scores_b, rel=1e-6)

    def test_empty_batch_is_a_no_op(self, store: Store) -> None:
        store.record([])
        assert store.popular(None, 10) == ([], [])

    # -- hostile input: validated before anything is written -------------------------------

    def test_numpy_ids_and_timestamps_become_plain_values(self, store: Store) -> None:
        now = time.time()
        store.record([Event(np.int64(5), np.int64(7), np.float64(now), "cart")])
        store.record([RawEvent(np.int32(5), np.uint16(8), np.int64(int(now)))])
        items, stamps, types = store.history(5)
        assert items == [7, 8] and [type(x) for x in items] == [int, int]
        assert stamps == [now, float(int(now))] and types == ["cart", "click"]
        ids, _ = store.popular(None, 10)
        assert sorted(ids) == [7, 8] and {type(x) for x in ids} == {int}
        assert store.status() == "ok"

    @pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
    def test_bad_ids_are_refused_and_nothing_of_the_batch_is_written(
        self, store: Store, bad: Any
    ) -> None:
        now = time.time()
        with pytest.raises(IdError, match=r"Event\.item_id"):
            Event("u", bad, now)
        with pytest.raises(IdError, match=r"Event\.user_id"):
            Event(bad, "a", now)
        good = Event("u", "a", now)
        with pytest.raises(IdError, match=r"events\[1\]\.item_id"):
            store.record([good, RawEvent("u", bad, now), good])
        with pytest.raises(IdError, match=r"events\[2\]\.user_id"):
            store.record([good, good, RawEvent(bad, "b", now)])
        assert store.history("u") == ([], [], [])
        assert store.popular(None, 10) == ([], [])

    @pytest.mark.parametrize(
        ("stamp", "message"),
        [
            (1e3, r"seconds since the epoch, got 1000\.0; accepted"),
            (
                1_764_000_000_000.0,
                r"seconds since the epoch, got 1764000000000\.0 \(milliseconds\?\)",
            ),
            (1_764_000_000_000_000, r"\(microseconds\?\)"),
            (float("inf"), "finite"),
            (float("nan"), "finite"),
            (10**400, "finite"),
            ("1764000000", r"a number\), got '1764000000'"),
            (None, "a number"),
            (True, "a number"),
        ],
    )
    def test_timestamps_must_be_seconds(self, new_store: Any, stamp: Any, message: str) -> None:
        """A millisecond timestamp weighed 2**(age_ms / half_life): one item scored 1.8e308
        and zeroed every other counter (memory), or raised OverflowError (Redis)."""
        store = new_store(half_life_s=HOUR)
        now = time.time()
        store.record([Event("u", "before", now)])
        with pytest.raises(InputError, match=message):
            Event("u", "x", stamp)
        with pytest.raises(InputError, match=r"events\[1\]\.timestamp: .*" + message):
            store.record([Event("u", "kept-out", now), RawEvent("u", "ms", stamp)])
        store.record([Event("u", "after", now)])
        assert store.history("u")[0] == ["before", "after"]
        ids, scores = store.popular(None, 10)
        assert sorted(ids) == ["after", "before"]
        assert scores == pytest.approx([1.0, 1.0], rel=1e-3)
        assert store.status() == "ok"

    def test_timestamps_from_the_future_or_before_2000_are_refused(self, store: Store) -> None:
        now = time.time()
        Event("u", "a", now + 3_600)  # clock skew is fine
        for stamp in (now + 2 * 86_400, 946_684_799.0, 0, -1.0):
            with pytest.raises(InputError, match="seconds since the epoch"):
                store.record([RawEvent("u", "a", stamp)])
        assert store.popular(None, 10) == ([], [])

    @pytest.mark.parametrize(
        ("field", "value", "message"),
        [
            ("event_type", "", "non-empty string"),
            ("event_type", None, "non-empty string"),
            ("event_type", 3, "non-empty string"),
            ("context", ["country", "de"], "mapping"),
            ("context", {"country": None}, r"context\['country'\]"),
            ("context", {"country": 1.5}, r"context\['country'\]"),
            ("context", {"": "x"}, "keys must be non-empty strings"),
            ("context", {3: "x"}, "keys must be non-empty strings"),
        ],
    )
    def test_bad_event_fields_are_refused(
        self, store: Store, field: str, value: Any, message: str
    ) -> None:
        raw = RawEvent("u", "a", time.time())
        setattr(raw, field, value)
        with pytest.raises(InputError, match=rf"events\[0\]\.{field}"):
            store.record([raw])
        with pytest.raises(InputError, match=message):
            store.record([raw])
        with pytest.raises(InputError, match=r"events\[0\]: expected an Event"):
            store.record([("u", "a", time.time())])  # type: ignore[list-item]
        assert store.history("u") == ([], [], []) and store.popular(None, 5) == ([], [])

    def test_int_context_values_are_spelled_as_text(self, store: Store) -> None:
        store.record([Event("u", "a", time.time(), context={"shop": 7})])  # type: ignore[dict-item]
        assert store.popular("shop=7", 5)[0] == ["a"]

    def test_a_refused_event_leaves_the_store_healthy(self, store: Store) -> None:
        """One None item used to reach the counters; every later read of the popular list was
        then degraded (Redis), for every user's blend."""
        now = time.time()
        with pytest.raises(IdError):
            store.record([Event("u", "a", now), RawEvent("u", None, now)])
        store.record([Event("v", "b", now)])
        r = store.fetch("v", [None], popular_limit=10, timeout_ms=500)
        assert r.ok and r.items == ["b"] and r.popular[None][0] == ["b"]
        assert store.status() == "ok"

    # -- popularity -----------------------------------------------------------------------

    def test_default_event_weights_are_the_project_table(self, new_store: Any) -> None:
        store = new_store()
        assert store.event_weights == DEFAULT_EVENT_WEIGHTS
        now = time.time()
        store.record([Event("u", t, now, t) for t in ("click", "cart", "order", "other")])
        got = dict(zip(*store.popular(None, 10), strict=True))
        want = {t: DEFAULT_EVENT_WEIGHTS.get(t, 1.0) for t in ("click", "cart", "order", "other")}
        assert got == pytest.approx(want, rel=1e-4)

    def test_an_empty_weight_table_weighs_every_type_1(self, new_store: Any) -> None:
        """``event_weights or defaults`` turned an explicit {} into the defaults."""
        store = new_store(event_weights={})
        now = time.time()
        store.record([Event("u", "a", now, "order"), Event("u", "b", now, "click")])
        assert dict(zip(*store.popular(None, 10), strict=True)) == pytest.approx(
            {"a": 1.0, "b": 1.0}, rel=1e-4
        )

    def test_popular_ranks_by_decayed_weight(self, new_store: Any) -> None:
        store = new_store(half_life_s=HOUR)
        now = time.time()
        store.record(
            [
                Event("u", "old-heavy", now - 3 * HOUR, "order"),  # 6 / 8 = 0.75 now
                Event("u", "new-light", now, "click"),  # 1.0 now
                Event("u", "mid-heavy", now - 2 * HOUR, "order"),  # 6 / 4 = 1.5 now
            ]
        )
        ids, scores = store.popular(None, 10)
        assert ids == ["mid-heavy", "new-light", "old-heavy"]
        assert scores == pytest.approx([1.5, 1.0, 0.75], rel=1e-3)
        assert store.popular(None, 2)[0] == ["mid-heavy", "new-light"]
        assert store.popular(None, 0) == ([], [])

    def test_event_weights_are_configurable(self, new_store: Any) -> None:
        store = new_store(event_weights={"view": 0.5, "buy": 10.0})
        now = time.time()
        store.record([Event("u", "a", now, "view"), Event("u", "b", now, "buy")])
        store.record([Event("u", "c", now, "unknown")])  # unknown types weigh 1
        ids, scores = store.popular(None, 10)
        assert ids == ["b", "c", "a"]
        assert scores == pytest.approx([10.0, 1.0, 0.5], rel=1e-4)

    def test_segments_count_apart_from_global(self, store: Store) -> None:
        now = time.time()
        store.record(
            [
                Event("u", "de-item", now, context={"country": "de"}),
                Event("u", "de-item", now, context={"country": "de", "device": "ios"}),
                Event("u", "fr-item", now, context={"country": "fr"}),
                Event("u", "fr-item", now, context={"country": "fr"}),
                Event("u", "fr-item", now, context={"country": "fr"}),
                Event("u", "no-ctx", now),
            ]
        )
        assert store.popular("country=de", 10)[0] == ["de-item"]
        assert store.popular("device=ios", 10)[0] == ["de-item"]
        assert store.popular("country=fr", 10)[0] == ["fr-item"]
        assert store.popular("country=xx", 10) == ([], [])
        ids, scores = store.popular(None, 10)
        assert ids == ["fr-item", "de-item", "no-ctx"]
        assert scores == pytest.approx([3.0, 2.0, 1.0], rel=1e-4)

    def test_threads_lose_no_counts(self, store: Store) -> None:
        """8 threads x 1,000 record() calls: histories capped, every count exact."""
        n_threads, n_calls, n_items = 8, 1_000, 50
        stamp = time.time() - 60.0
        errors: list[BaseException] = []
        start = threading.Barrier(n_threads)

        def work(t: int) -> None:
            try:
                start.wait()
                for i in range(n_calls):
                    store.record([Event(f"t{t}", i % n_items, stamp + i * 1e-3)])
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        for t in range(n_threads):
            items, _, _ = store.history(f"t{t}")
            assert items == [i % n_items for i in range(n_calls - 200, n_calls)]
        ids, scores = store.popular(None, 10 * n_items)
        now = time.time()
        expected = {
            item: sum(
                n_threads * math.exp2((stamp + i * 1e-3 - now) / 86_400.0)
                for i in range(item, n_calls, n_items)
            )
            for item in range(n_items)
        }
        assert sorted(ids) == list(range(n_items))
        got = dict(zip(ids, scores, strict=True))
        for item, want in expected.items():
            assert got[item] == pytest.approx(want, rel=1e-6), item
        assert sum(scores) == pytest.approx(sum(expected.values()), rel=1e-6)

    # -- the hot-path read -----------------------------------------------------------------

    def test_fetch_reads_history_and_segments_at_once(self, store: Store) -> None:
        now = time.time()
        store.record(
            [
                Event("u", "a", now - 2, "cart", {"c": "x"}),
                Event("u", 2, now - 1),
                Event("v", "a", now, "order", {"c": "x"}),
            ]
        )
        r = store.fetch("u", [None, "c=x", "c=none"], popular_limit=5, timeout_ms=100)
        assert r.ok
        assert (r.items, r.event_types) == (["a", 2], ["cart", "click"])
        assert r.popular[None][0] == ["a", 2]
        assert r.popular["c=x"][0] == ["a"]
        assert r.popular["c=none"] == ([], [])
        assert store.fetch("u", [None], history_limit=1, popular_limit=1).items == [2]
        only_pop = store.fetch(None, [None], popular_limit=1)
        assert only_pop.items == [] and only_pop.popular[None][0] == ["a"]
        only_hist = store.fetch("u", [None], popular_limit=0)
        assert only_hist.items == ["a", 2] and only_hist.popular == {}

    def test_result_cache_round_trip(self, store: Store) -> None:
        assert store.cache_get("k") is None
        assert store.cache_set("k", b"\x00blob", ttl_s=0.2)
        assert store.cache_get("k") == b"\x00blob"
        time.sleep(0.3)
        assert store.cache_get("k") is None

    # -- expiry and lifecycle -------------------------------------------------------------

    def test_history_expires_after_its_ttl(self, new_store: Any) -> None:
        if not self.supports_history_ttl:
            pytest.skip(f"{type(self).__name__}: this backend has no history TTL")
        store = new_store(history_ttl_s=1.0)
        store.record([Event("u", "a", time.time())])
        assert store.history("u")[0] == ["a"]
        time.sleep(1.2)
        assert store.history("u") == ([], [], [])
        assert store.popular(None, 5)[0] == ["a"]  # counters do not expire with histories

    def test_close_twice(self, new_store: Any) -> None:
        store = new_store()
        store.close()
        store.close()
