"""Fan-out semantics: deadlines, failures, required sources, exclusions, backfill, breaker."""

import asyncio
import threading
import time

import numpy as np
import pytest

from blender.breaker import CircuitBreaker
from blender.fanout import Blender, RequiredSourceError, SourceSlot
from blender.lanes import Arrivals
from retrieval.types import Request, SourceStatus
from sources.base import SourceContext
from tests.toy_sources import CatalogSource, HistoryEcho, ListParams, ListSource


def src(name, items=(), **kw):
    return ListSource(name, ListParams(items=list(items), **kw), SourceContext())


def slot(source, **kw):
    return SourceSlot(source=source, **kw)


@pytest.fixture(params=["side by side", "in turn"])
def blenders(request):
    """Blenders whose calls run on their own lanes, or take turns on one runner (as when
    every core is busy): every test holds for both."""
    made = []

    def make(slots, **kw):
        b = Blender(slots, **kw)
        if request.param == "in turn":
            b._cores = 0
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def test_slow_source_times_out_and_does_not_delay(blenders):
    b = blenders(
        [slot(src("fast", [1, 2, 3])), slot(src("slow", [9], delay_ms=2000))],
        k=10,
        deadline_ms=100,
    )
    t0 = time.monotonic()
    res = b.blend(Request(user_id=1))
    took = time.monotonic() - t0
    assert res.report("slow").status is SourceStatus.TIMEOUT
    assert res.report("fast").status is SourceStatus.OK
    assert res.item_ids.tolist() == [1, 2, 3]
    assert took < 1.0  # generous: the slow source sleeps 2 s


def test_per_source_timeout_is_shorter_than_deadline(blenders):
    b = blenders(
        [slot(src("fast", [1])), slot(src("slowish", [2], delay_ms=300), timeout_ms=30)],
        k=10,
        deadline_ms=5000,
    )
    t0 = time.monotonic()
    res = b.blend(Request())
    assert res.report("slowish").status is SourceStatus.TIMEOUT
    assert time.monotonic() - t0 < 2.0


def test_raising_source_is_error_and_blend_goes_on(blenders):
    b = blenders([slot(src("ok", [1, 2])), slot(src("bad", fail=True))], k=10)
    res = b.blend(Request())
    assert res.report("bad").status is SourceStatus.ERROR
    assert "exploded" in res.report("bad").error
    assert res.item_ids.tolist() == [1, 2]


def test_required_source_failure_raises(blenders):
    b = blenders([slot(src("ok", [1])), slot(src("bad", fail=True), required=True)], k=10)
    with pytest.raises(RequiredSourceError, match="required source 'bad' error"):
        b.blend(Request())


def test_required_source_timeout_raises(blenders):
    b = blenders([slot(src("slow", [1], delay_ms=1000), required=True)], k=10, deadline_ms=50)
    with pytest.raises(RequiredSourceError, match="timeout"):
        b.blend(Request())


def test_dedupe_and_provenance(blenders):
    b = blenders([slot(src("a", [1, 2, 3])), slot(src("b", [3, 2, 7]))], k=10, rrf_k=0)
    res = b.blend(Request())
    assert len(set(res.item_ids.tolist())) == len(res) == 4
    by_id = {c.item_id: c for c in res}
    assert by_id[2].ranks == {"a": 1, "b": 1}
    assert by_id[3].sources == ("a", "b")
    assert by_id[7].ranks == {"b": 2}
    assert res.report("a").returned == 3 and res.report("a").survived == 3


def test_exclusions_and_exclude_seen(blenders):
    b = blenders([slot(src("a", [1, 2, 3, 4, 5]))], k=10, exclude_seen=True)
    req = Request(history=(2,), exclude=frozenset({"4"}))
    before = set(req.exclude)
    res = b.blend(req)
    assert res.item_ids.tolist() == [1, 3, 5]
    assert set(req.exclude) == before  # caller's set untouched
    b2 = blenders([slot(src("a", [1, 2, 3]))], k=10, exclude_seen=False)
    assert b2.blend(Request(history=(2,))).item_ids.tolist() == [1, 2, 3]


def test_blocklist(blenders):
    b = blenders([slot(src("a", [1, 2, 3]))], k=10, blocklist=np.array([2]))
    assert b.blend(Request()).item_ids.tolist() == [1, 3]


def test_sources_asked_for_extra_to_cover_exclusions(blenders):
    a = src("a", list(range(1, 101)))
    b = blenders([slot(a)], k=5, exclude_seen=True)
    res = b.blend(Request(history=(1, 2, 3)))
    assert res.item_ids.tolist() == [4, 5, 6, 7, 8]


def test_backfill_from_fallback(blenders):
    pop = CatalogSource("pop", CatalogSource.Params(n=50), SourceContext())
    b = blenders(
        [slot(src("a", [40, 41])), slot(pop, weight=0.0)],
        k=10,
        fallback="pop",
        exclude_seen=True,
    )
    res = b.blend(Request(history=tuple(range(1, 9))))
    assert len(res) == 10
    assert res.item_ids[:1].tolist() == [40]
    assert not set(res.item_ids.tolist()) & set(range(1, 9))
    assert len(set(res.item_ids.tolist())) == 10


def test_backfill_asks_fallback_deeper_when_exclusions_eat_its_list(blenders):
    pop = CatalogSource("pop", CatalogSource.Params(n=1000), SourceContext())
    b = blenders([slot(pop)], k=5, fallback="pop", blocklist=np.arange(1, 50))
    res = b.blend(Request())
    assert res.item_ids.tolist() == [50, 51, 52, 53, 54]
    assert res.backfilled == 5


def test_breaker_opens_then_probe_closes(blenders):
    bad = src("flaky", [5], fail=True)
    breaker = CircuitBreaker(failures=2, cooldown_s=0.2)
    b = blenders([slot(src("ok", [1])), slot(bad, breaker=breaker)], k=10)
    assert b.blend(Request()).report("flaky").status is SourceStatus.ERROR
    assert b.blend(Request()).report("flaky").status is SourceStatus.ERROR
    calls = bad.calls
    res = b.blend(Request())
    assert res.report("flaky").status is SourceStatus.CIRCUIT_OPEN
    assert bad.calls == calls  # not called while open
    time.sleep(0.25)
    bad.fail = False
    res = b.blend(Request())
    assert res.report("flaky").status is SourceStatus.OK
    assert b.blend(Request()).report("flaky").status is SourceStatus.OK


def test_zero_healthy_sources_gives_empty_set_with_reports(blenders):
    b = blenders([slot(src("x", fail=True)), slot(src("y", skip=True))], k=10)
    res = b.blend(Request())
    assert len(res) == 0
    assert [r.status for r in res.reports] == [SourceStatus.ERROR, SourceStatus.SKIPPED]
    assert res.to_dict()["count"] == 0


def test_source_needs_are_checked_per_request(blenders):
    echo = HistoryEcho("echo", HistoryEcho.Params(), SourceContext())
    b = blenders([slot(echo)], k=10)
    res = b.blend(Request(user_id=3))
    assert res.report("echo").status is SourceStatus.SKIPPED
    assert "history" in res.report("echo").error
    assert b.blend(Request(history=(1, 2))).item_ids.tolist() == [1002, 1001]


def test_deterministic_regardless_of_finish_order(blenders):
    # b finishes first in one blender, last in the other; the results must be identical.
    fast_first = blenders([slot(src("a", [1, 2, 3], delay_ms=30)), slot(src("b", [3, 4, 1]))], k=10)
    slow_first = blenders([slot(src("a", [1, 2, 3])), slot(src("b", [3, 4, 1], delay_ms=30))], k=10)
    r1, r2 = fast_first.blend(Request()), slow_first.blend(Request())
    assert r1.item_ids.tolist() == r2.item_ids.tolist()
    assert np.array_equal(r1.ranks, r2.ranks)
    assert np.allclose(r1.scores, r2.scores)


def test_concurrent_blends_match_serial(blenders):
    b = blenders(
        [
            slot(src("a", list(range(0, 300)))),
            slot(src("b", list(range(150, 450)))),
            slot(src("c", list(range(100, 200)), delay_ms=1)),
        ],
        k=200,
        deadline_ms=2000,
    )
    requests = [Request(user_id=i, history=tuple(range(i, i + 20))) for i in range(40)]
    serial = [b.blend(r).item_ids.tolist() for r in requests]
    out = [None] * len(requests)

    def work(lo):
        for i in range(lo, len(requests), 8):
            out[i] = b.blend(requests[i]).item_ids.tolist()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == serial


def test_ablend_matches_blend_and_honours_deadline(blenders):
    b = blenders(
        [slot(src("a", [1, 2])), slot(src("slow", [3], delay_ms=1500))], k=10, deadline_ms=80
    )
    res = asyncio.run(b.ablend(Request()))
    assert res.item_ids.tolist() == [1, 2]
    assert res.report("slow").status is SourceStatus.TIMEOUT


def test_each_source_is_told_its_time_left(blenders):
    seen = {}

    class Spy(ListSource):
        def retrieve(self, request, k, deadline):
            seen[self.name] = deadline.remaining_ms()
            return super().retrieve(request, k, deadline)

    s1 = Spy("short", ListParams(items=[1]), SourceContext())
    s2 = Spy("long", ListParams(items=[2]), SourceContext())
    b = blenders([slot(s1, timeout_ms=20), slot(s2)], k=10, deadline_ms=500)
    b.blend(Request())
    assert 0 < seen["short"] <= 20
    assert 20 < seen["long"] <= 500


def test_iteration_yields_light_views_and_json(blenders):
    b = blenders([slot(src("a", ["x", "y"]))], k=10)
    res = b.blend(Request())
    c = next(iter(res))
    assert c.item_id == "x" and c.sources == ("a",)
    d = res.to_dict()
    assert d["candidates"][0]["item_id"] == "x"
    assert res.to_json().startswith("{")


def test_blocklist_file_and_a_missing_one(tmp_path):
    from blender.filters import load_blocklist

    path = tmp_path / "blocked.txt"
    path.write_text("# never show these\n7\n\nsku-9  # a string id\n-3\n")
    assert sorted(load_blocklist(path).tolist()) == ["-3", "7", "sku-9"]
    with pytest.raises(ValueError, match=r"blend\.blocklist: cannot read"):
        load_blocklist(tmp_path / "nope.txt")


def test_blend_returns_when_the_last_answer_lands_not_at_the_deadline(blenders):
    b = blenders([slot(src("a", [1, 2])), slot(src("b", [3], delay_ms=50))], deadline_ms=5000)
    for run in (b.blend, lambda r: asyncio.run(b.ablend(r))):
        t0 = time.monotonic()
        res = run(Request())
        assert res.item_ids.tolist() == [1, 3, 2]
        assert time.monotonic() - t0 < 2.0  # the deadline is 5 s away


def test_ablend_stops_waiting_once_the_rest_are_past_their_own_timeout(blenders):
    b = blenders(
        [slot(src("fast", [1])), slot(src("slowish", [2], delay_ms=3000), timeout_ms=30)],
        deadline_ms=5000,
    )
    t0 = time.monotonic()
    res = asyncio.run(b.ablend(Request()))
    assert res.report("slowish").status is SourceStatus.TIMEOUT
    assert res.item_ids.tolist() == [1]
    assert time.monotonic() - t0 < 2.0


def test_arrivals_wake_the_caller_only_once_every_call_has_started():
    arrivals = Arrivals()
    due = time.monotonic() + 5.0
    for i in range(3):
        arrivals.expect(i, due)
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: (arrivals.wait(restart=pytest.fail), woke.set()))
    waiter.start()
    for i in range(3):
        arrivals.arrive(i)
    # Every call is in, but the caller has not said it started them all: no wake yet.
    assert not woke.wait(0.1)
    arrivals.fanned_out()
    arrivals.expect(3, due)  # (a late registration is waited for like the others)
    assert not woke.wait(0.1)
    arrivals.arrive(3)
    assert woke.wait(2.0)
    waiter.join()


def test_arrivals_stop_waiting_when_the_rest_are_past_their_time():
    arrivals = Arrivals()
    now = time.monotonic()
    arrivals.expect(0, now + 0.05)  # never arrives
    arrivals.expect(1, now + 5.0)
    arrivals.fanned_out()
    threading.Timer(0.01, arrivals.arrive, args=(1,)).start()
    arrivals.wait(restart=pytest.fail)
    assert time.monotonic() - now < 2.0
    assert arrivals.until() is None
