"""Hostile sources: hung, slow, lying. One source's misbehaviour stays that source's problem."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blender.breaker import BreakerState, CircuitBreaker
from blender.fanout import Blender, RequestLimits, SourceSlot, checked_answer
from blender.lanes import Lane
from retrieval.errors import IdError, RequestTooLarge, SourceError
from retrieval.types import Deadline, Request, SourceStatus
from sources.base import Ranked, Source, SourceContext
from tests.toy_sources import CatalogSource, ListParams, ListSource


class Hang(Source):
    """Blocks until released (a source stuck on a dead socket), then returns one id."""

    def __init__(self, name: str = "hang") -> None:
        super().__init__(name, ListParams(), SourceContext())
        self.release = threading.Event()
        self.running = 0
        self.closed_while_running = False
        self.closed = False
        self._lock = threading.Lock()

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        with self._lock:
            self.running += 1
        try:
            self.release.wait()
            return np.array([77], dtype=np.int64), np.array([1.0], dtype=np.float32)
        finally:
            with self._lock:
                self.running -= 1

    def close(self) -> None:
        self.closed = True
        self.closed_while_running = self.running > 0


class Answer(Source):
    """Returns whatever it was given, untouched: the raw material of a lying source."""

    def __init__(self, name: str, answer: Any) -> None:
        super().__init__(name, ListParams(), SourceContext())
        self.answer = answer

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        return self.answer  # type: ignore[no-any-return]


def listed(name: str, items: list[Any], **kw: Any) -> ListSource:
    return ListSource(name, ListParams(items=items, **kw), SourceContext())


@pytest.fixture(params=["side by side", "in turn"])
def blenders(request: pytest.FixtureRequest) -> Any:
    """Blenders whose calls run on their own lanes, or take turns on one runner (as when every
    core is busy): each promise holds for both."""
    made: list[tuple[Blender, list[Hang]]] = []

    def make(slots: list[SourceSlot], hangs: tuple[Hang, ...] = (), **kw: Any) -> Blender:
        b = Blender(slots, **kw)
        if request.param == "in turn":
            b._cores = 0
        made.append((b, list(hangs)))
        return b

    yield make
    for b, hangs in made:
        for h in hangs:
            h.release.set()
        b.close(timeout_s=2.0)


# -- 1. a hung source cannot take the retriever down --------------------------------------------


def test_hung_source_never_starves_a_healthy_one(blenders):
    hang = Hang()
    b = blenders(
        [
            SourceSlot(listed("good", [1, 2, 3])),
            SourceSlot(hang, breaker=CircuitBreaker(failures=10_000)),  # breaker never helps
        ],
        (hang,),
        k=10,
        deadline_ms=30,
        workers=3,
    )
    statuses = []
    for _ in range(40):
        res = b.blend(Request(user_id=1))
        assert res.report("good").status is SourceStatus.OK
        assert res.item_ids.tolist() == [1, 2, 3]
        statuses.append(res.report("hang").status)
    # Three calls hang (the lane's cap); every later one is shed at once, not queued.
    assert statuses[:3] == [SourceStatus.TIMEOUT] * 3
    assert set(statuses[3:]) == {SourceStatus.SHED}
    assert hang.running == 3


def test_a_source_hung_in_turn_costs_the_next_at_most_a_quarter_of_its_time():
    """When every core is busy a blend's calls take turns on one runner; one that hangs there
    must not take the calls queued behind it down with it."""
    hang = Hang()
    b = Blender(
        [
            SourceSlot(hang, timeout_ms=100),  # the earliest deadline: it runs first
            SourceSlot(listed("good", [1, 2, 3])),
        ],
        k=10,
        deadline_ms=800,
    )
    b._cores = 0  # as if every core were busy
    try:
        t0 = time.monotonic()
        res = b.blend(Request(user_id=1))
        took = time.monotonic() - t0
        assert res.report("hang").status is SourceStatus.TIMEOUT
        assert res.report("good").status is SourceStatus.OK
        assert res.item_ids.tolist() == [1, 2, 3]
        # "good" was taken back a quarter into its 800 ms and answered at once.
        assert took < 0.6
    finally:
        hang.release.set()
        b.close(timeout_s=2.0)


def test_in_turn_calls_share_one_runner_thread_and_side_by_side_ones_do_not(blenders):
    seen: dict[str, str] = {}

    class Where(ListSource):
        def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
            seen[self.name] = threading.current_thread().name
            return super().retrieve(request, k, deadline)

    b = blenders(
        [SourceSlot(Where(n, ListParams(items=[1]), SourceContext())) for n in "abc"],
        deadline_ms=5000,  # a runner slow to start on a busy machine is not taken for stalled
    )
    b.blend(Request())
    names = set(seen.values())
    in_turn = b._cores == 0
    assert len(seen) == 3 and len(names) == (1 if in_turn else 3)
    assert all(n.startswith("lane-turns" if in_turn else "lane-") for n in names)


def test_source_recovers_after_it_stops_hanging(blenders):
    hang = Hang()
    breaker = CircuitBreaker(failures=2, cooldown_s=0.05)
    b = blenders([SourceSlot(hang, breaker=breaker)], (hang,), k=5, deadline_ms=20, workers=2)
    for _ in range(5):
        b.blend(Request(user_id=1))
    assert breaker.state is not BreakerState.CLOSED
    hang.release.set()
    time.sleep(0.1)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        if b.blend(Request(user_id=1)).report("hang").status is SourceStatus.OK:
            break
        time.sleep(0.02)
    assert b.blend(Request(user_id=1)).report("hang").status is SourceStatus.OK


def test_process_exits_with_a_hung_source(tmp_path):
    script = tmp_path / "hung.py"
    script.write_text(
        textwrap.dedent(
            """
            import threading, numpy as np
            from blender.fanout import Blender, SourceSlot
            from retrieval.types import Request
            from sources.base import Source, SourceContext
            from tests.toy_sources import ListParams

            class Forever(Source):
                def retrieve(self, request, k, deadline):
                    threading.Event().wait()

            b = Blender([SourceSlot(Forever("f", ListParams(), SourceContext()))], deadline_ms=20)
            print(b.blend(Request(user_id=1)).report("f").status.value, flush=True)
            """
        )
    )
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=30, cwd="."
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "timeout"
    assert time.monotonic() - t0 < 20


# -- 2. backfill keeps the deadline --------------------------------------------------------------


class SlowWhenDeep(CatalogSource):
    """Fast for the fan-out's ask, half a second for the backfill's deeper one."""

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        if k > 50:
            time.sleep(0.5)
        return super().retrieve(request, k, deadline)


def test_backfill_never_runs_past_the_deadline(blenders):
    pop = SlowWhenDeep("pop", CatalogSource.Params(n=100), SourceContext())
    b = blenders([SourceSlot(pop)], k=10, deadline_ms=50, fallback="pop")
    # Everything the first answer holds is excluded, so the backfill must ask deeper.
    t0 = time.monotonic()
    res = b.blend(Request(user_id=1, exclude=frozenset(range(1, 12))))
    took_ms = (time.monotonic() - t0) * 1000
    assert took_ms < 150, took_ms  # was ~500 ms: the deeper ask ran on the caller's thread
    assert res.report("pop").status is SourceStatus.OK


# -- 3. request size is bounded up front ---------------------------------------------------------


def test_oversized_requests_are_refused_and_trip_no_breaker(blenders):
    b = blenders(
        [SourceSlot(listed("good", list(range(20))))],
        k=10,
        limits=RequestLimits(max_exclude=1000, max_seed_items=100, max_history=100),
    )
    with pytest.raises(RequestTooLarge, match=r"exclude.*max_exclude = 1000"):
        b.blend(Request(user_id=1, exclude=frozenset(range(100_000))))
    with pytest.raises(RequestTooLarge, match="seed_items"):
        b.blend(Request(user_id=1, seed_items=tuple(range(10_000))))
    with pytest.raises(RequestTooLarge, match="history"):
        b.blend(Request(user_id=1, history=tuple(range(101))))
    res = b.blend(Request(user_id=1))
    assert res.report("good").status is SourceStatus.OK
    assert len(res) == 10


def test_merge_reserve_must_leave_time_for_sources():
    with pytest.raises(ValueError, match="merge_reserve_ms"):
        Blender([SourceSlot(listed("a", [1]))], deadline_ms=10, merge_reserve_ms=10)


# -- 4. a source's output is checked at one boundary --------------------------------------------


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ((np.ones((2, 2), dtype=np.int64), np.ones((2, 2), dtype=np.float32)), "1-D"),
        ((np.arange(3), np.ones(2, dtype=np.float32)), "same length"),
        ((np.arange(3), np.array([1.0, np.nan, 0.5])), "non-finite"),
        ((np.arange(3), np.array([np.inf, 1.0, 0.5])), "non-finite"),
        ((np.array([1, "a", 2.5, None], dtype=object), np.ones(4)), "float|mixes"),
        ((np.array([2**64 - 1], dtype=np.uint64), np.ones(1)), "int64"),
        (([True, False], [1.0, 0.5]), "bool"),
        ("not a pair", "pair"),
        ((np.arange(2), np.array(["x", "y"])), "numbers"),
    ],
)
def test_contract_breaches_are_that_sources_error_alone(blenders, answer, problem):
    b = blenders(
        [SourceSlot(listed("good", [1, 2, 3])), SourceSlot(Answer("liar", answer))],
        k=10,
        strategy="score",
    )
    res = b.blend(Request(user_id=1))
    rep = res.report("liar")
    assert rep.status is SourceStatus.ERROR
    assert rep.error is not None
    assert re.search(problem, rep.error), rep.error
    assert res.report("good").status is SourceStatus.OK
    assert res.item_ids.tolist() == [1, 2, 3]
    assert res.item_ids.dtype == np.int64


def test_repeated_ids_get_first_rank_and_no_summed_credit(blenders):
    ids = np.array([5, 6] + [999] * 100, dtype=np.int64)
    liar = Answer("liar", (ids, np.linspace(1.0, 0.1, ids.size, dtype=np.float32)))
    b = blenders([SourceSlot(listed("good", [1, 2, 3])), SourceSlot(liar)], k=10)
    res = b.blend(Request(user_id=1))
    assert res.report("liar").returned == 3
    row = res.item_ids.tolist().index(999)
    assert res[row].ranks == {"liar": 2}  # its first rank, not its last (was 99)
    # One rank's credit, not a hundred: last, after good's 3 (also rank 2; ties go by id).
    assert res.item_ids.tolist() == [1, 5, 2, 6, 3, 999]


def test_checked_answer_keeps_a_clean_answer_as_is():
    ids, scores = checked_answer((np.array([3, 1, 2]), np.array([0.9, 0.5, 0.1])), k=2)
    assert ids.tolist() == [3, 1] and ids.dtype == np.int64
    assert scores.dtype == np.float32 and scores.tolist() == pytest.approx([0.9, 0.5])
    with pytest.raises(IdError):
        checked_answer((np.array([1.5]), np.array([1.0])), k=1)
    with pytest.raises(SourceError):
        checked_answer((np.array([1]), np.array([np.nan])), k=1)


# -- 5. closing never pulls a source from under a running call ----------------------------------


def test_close_waits_for_calls_in_flight_and_leaves_hung_sources_open():
    hang = Hang()
    slow = listed("slow", [1, 2], delay_ms=300)
    closed_at: list[float] = []
    finished_at: list[float] = []
    original = slow.retrieve

    def timed(request: Request, k: int, deadline: Deadline) -> Ranked:
        out = original(request, k, deadline)
        finished_at.append(time.monotonic())
        return out

    slow.retrieve = timed  # type: ignore[method-assign]
    b = Blender([SourceSlot(slow), SourceSlot(hang)], k=5, deadline_ms=20)
    b.blend(Request(user_id=1))  # both abandoned at the deadline, both still running
    busy = b.close(timeout_s=1.0)
    closed_at.append(time.monotonic())
    assert busy == ["hang"]
    assert finished_at and finished_at[0] <= closed_at[0]  # waited for the slow call
    hang.release.set()


def test_retriever_close_does_not_close_a_source_mid_query(tmp_path):
    from retrieval.config import RetrievalConfig
    from retrieval.online.retriever import Retriever

    cfg = RetrievalConfig.load(
        {
            "deadline_ms": 20,
            "sources": [{"name": "hang", "kind": "tests.test_isolation:Hang2"}],
        }
    )
    r = Retriever(cfg)
    src = r.sources[0]
    assert isinstance(src, Hang2)
    r.blend(user_id=1)
    r.close(timeout_s=0.2)
    assert not src.closed  # a query still runs on it
    src.release.set()


class Hang2(Hang):
    def __init__(self, name: str, params: Any, context: SourceContext) -> None:
        super().__init__(name)


# -- 9. the breaker counts only the source's own failures ----------------------------------------


def test_late_start_is_not_held_against_the_breaker(blenders):
    breaker = CircuitBreaker(failures=1, cooldown_s=60)
    b = blenders(
        [SourceSlot(listed("slowish", [1], delay_ms=40), breaker=breaker)],
        k=5,
        deadline_ms=50,
    )
    # 45 ms of the 50 ms budget went on before the fan-out (a slow store, a busy CPU).
    res = b.blend(Request(user_id=1), started=time.monotonic() - 0.045)
    assert res.report("slowish").status in (SourceStatus.TIMEOUT, SourceStatus.SHED)
    assert breaker.state is BreakerState.CLOSED
    # Given its whole budget and still late, it is its own failure.
    slow = blenders(
        [SourceSlot(listed("slow", [1], delay_ms=200), breaker=breaker)], k=5, deadline_ms=50
    )
    assert slow.blend(Request(user_id=1)).report("slow").status is SourceStatus.TIMEOUT
    assert breaker.state is BreakerState.OPEN


def test_lane_sheds_beyond_its_cap_and_refuses_after_close():
    lane = Lane("x", cap=2)
    gate = threading.Event()
    futs = [lane.try_submit(gate.wait) for _ in range(3)]
    assert futs[0] is not None and futs[1] is not None and futs[2] is None
    assert lane.in_flight == 2
    gate.set()
    assert all(f.result(timeout=2) for f in futs[:2] if f is not None)
    assert lane.close(timeout_s=2.0)
    with pytest.raises(RuntimeError, match="closed"):
        lane.try_submit(int)


def test_a_lane_whose_deliver_raises_logs_it_and_keeps_serving(caplog):
    """A job's ``deliver`` runs on the lane's thread after the call: if it raises, the error is
    logged and the thread takes the next job (the call no longer counts as in flight)."""
    lane = Lane("x", cap=1)
    delivered: list[Any] = []

    def broken(key: Any, result: Any, error: BaseException | None) -> None:
        raise RuntimeError("deliver broke")

    def kept(key: Any, result: Any, error: BaseException | None) -> None:
        delivered.append((key, result, error))

    with caplog.at_level("ERROR", logger="blender.lanes"):
        assert lane.try_start(int, ("7",), broken, "first")
        deadline = time.monotonic() + 2
        while lane.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lane.try_start(int, ("8",), kept, "second")  # the cap of 1 is free again
        while not delivered and time.monotonic() < deadline:
            time.sleep(0.01)
    assert delivered == [("second", 8, None)]
    assert "delivering a result failed" in caplog.text
    assert lane.close(timeout_s=2.0)


# -- 11. leaky defaults ----------------------------------------------------------------------------


def test_close_gives_the_host_its_blas_threads_back():
    from threadpoolctl import threadpool_info

    from retrieval.config import RetrievalConfig
    from retrieval.online.retriever import Retriever

    before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    r = Retriever(
        RetrievalConfig.load({"sources": [{"name": "a", "kind": "tests.toy_sources:ListSource"}]})
    )
    during = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    r.close()
    after = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    assert all(n == 1 for n in during)
    assert after == before


def test_module_blend_sees_a_changed_config(tmp_path):
    from retrieval.online.retriever import blend

    path = tmp_path / "c.yaml"
    path.write_text(
        "sources:\n  - {name: a, kind: 'tests.toy_sources:ListSource', params: {items: [1, 2]}}\n"
    )
    assert blend(path, user_id=1).item_ids.tolist() == [1, 2]
    time.sleep(0.01)
    path.write_text(
        "sources:\n  - {name: a, kind: 'tests.toy_sources:ListSource', params: {items: [3]}}\n"
    )
    assert blend(path, user_id=1).item_ids.tolist() == [3]


def test_a_shadowing_sources_package_is_named_not_mysterious(tmp_path):
    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / "__init__.py").write_text("")
    out = subprocess.run(
        [sys.executable, "-c", "from retrieval import Retriever"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "ImportError" in last and str(tmp_path / "sources") in last
    assert "candidate-retrieval" in last


def test_live_popularity_uses_the_configured_event_weights():
    from retrieval.config import RetrievalConfig
    from retrieval.online.retriever import Retriever

    cfg = RetrievalConfig.load(
        {
            "events": {"weights": {"click": 1.0, "order": 50.0}},
            "sources": [{"name": "a", "kind": "tests.toy_sources:ListSource"}],
        }
    )
    with Retriever(cfg) as r:
        now = time.time()
        r.record(1, item_id=10, timestamp=now, event_type="click")
        r.record(2, item_id=10, timestamp=now, event_type="click")
        r.record(3, item_id=20, timestamp=now, event_type="order")
        ids, scores = r.store.popular(None, 2)
    assert list(ids) == [20, 10]
    assert scores[0] == pytest.approx(50.0, rel=1e-3) and scores[1] == pytest.approx(2.0, rel=1e-3)


def test_store_history_is_trimmed_to_the_request_limit():
    from retrieval.config import RetrievalConfig
    from retrieval.online.retriever import Retriever

    cfg = RetrievalConfig.load(
        {
            "limits": {"max_history": 5},
            "sources": [{"name": "a", "kind": "tests.toy_sources:ListSource"}],
        }
    )
    with Retriever(cfg) as r:
        now = time.time()
        for i in range(20):
            r.record(7, item_id=100 + i, timestamp=now + i)
        req = r.request(user_id=7)
        assert req.history == (115, 116, 117, 118, 119)
        assert r.blend(user_id=7).report("a").status is SourceStatus.OK


def test_closing_under_load_never_crashes_a_real_annoy_query(tmp_path):
    """close() used to unload annoy while a query still ran in it: SIGSEGV (exit 139).

    A real annoy index big enough that one query (search_k 2M) takes ~100 ms of native code;
    the retriever is closed 30 ms into it. Run in a subprocess: a crash is an exit code."""
    from retrieval.tools.cli import main

    n, d = 100_000, 32
    rng = np.random.default_rng(0)
    np.save(tmp_path / "emb.npy", rng.standard_normal((n, d)).astype(np.float32))
    np.save(tmp_path / "emb_ids.npy", np.arange(n, dtype=np.int64))
    (tmp_path / "log.csv").write_text(
        "user_id,item_id,timestamp\n" + "".join(f"{u},{u * 7},{1.7e9 + u}\n" for u in range(50))
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "k: 100\ndeadline_ms: 5000\nartifacts: build\nsources:\n"
        "  - {name: ann, kind: ann, params: {backend: annoy, "
        f"embeddings: {tmp_path / 'emb.npy'}, embedding_ids: {tmp_path / 'emb_ids.npy'}, "
        "metric: angular, n_trees: 10, search_k: 2000000}}\n"
    )
    assert main(["build", str(cfg), "--events", str(tmp_path / "log.csv")]) == 0
    script = tmp_path / "close_under_load.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import threading, time
            import numpy as np
            from retrieval import Retriever
            r = Retriever.from_yaml({str(cfg)!r})
            vec = np.ones({d}, dtype=np.float32)
            done = []
            t = threading.Thread(target=lambda: done.append(r.blend(vector=vec)))
            t.start()
            time.sleep(0.03)
            r.close(timeout_s=10.0)  # the query is still in annoy's native code
            t.join()
            print(done[0].report("ann").status.value)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.split()[-1] == "ok"


def test_the_blend_command_exits_with_a_hung_source(tmp_path):
    """`retrieval blend` printed its answer, then hung in concurrent.futures' exit hook."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "deadline_ms: 30\nsources:\n"
        "  - {name: good, kind: 'tests.toy_sources:ListSource', params: {items: [1, 2]}}\n"
        "  - {name: hang, kind: 'tests.test_isolation:Hang2'}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "retrieval.tools.cli", "blend", str(cfg), "--user", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    reports = {r["name"]: r["status"] for r in json.loads(out.stdout)["reports"]}
    assert reports == {"good": "ok", "hang": "timeout"}


def test_the_retriever_refuses_an_oversized_request_before_reading_the_store():
    from retrieval.config import RetrievalConfig
    from retrieval.online.retriever import Retriever

    cfg = RetrievalConfig.load({"sources": [{"name": "a", "kind": "tests.toy_sources:ListSource"}]})
    with Retriever(cfg) as r:
        reads: list[Any] = []
        fetch = r.store.fetch
        r.store.fetch = lambda *a, **kw: reads.append(a) or fetch(*a, **kw)  # type: ignore[method-assign]
        t0 = time.monotonic()
        with pytest.raises(RequestTooLarge, match="max_exclude = 10000"):
            r.blend(user_id=1, exclude=range(100_000))
        assert time.monotonic() - t0 < 1.0
        assert reads == []
        assert r.blend(user_id=1).report("a").status is SourceStatus.OK


def test_a_closed_retriever_says_so():
    from retrieval.config import RetrievalConfig
    from retrieval.errors import ClosedError
    from retrieval.online.retriever import Retriever

    r = Retriever(
        RetrievalConfig.load({"sources": [{"name": "a", "kind": "tests.toy_sources:ListSource"}]})
    )
    r.close()
    with pytest.raises(ClosedError, match="closed"):
        r.blend(user_id=1)
    with pytest.raises(ClosedError):
        r.blender.blend(Request(user_id=1))  # a blend that got past the gate before close()
