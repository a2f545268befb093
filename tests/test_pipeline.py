"""The request path as named steps over one context: the order of the steps, one core for blend
and ablend, the typed facade, and k and the deadline derived once."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from typing import Any

import numpy as np
import pytest

import retrieval.online.retriever as retriever_module
from blender.fanout import STEPS, BlendContext, Blender, SourceSlot
from retrieval.config import RetrievalConfig
from retrieval.errors import InputError
from retrieval.online.retriever import SERVING_STEPS, Retriever, blend
from retrieval.types import CandidateSet, Deadline, Request, SourceStatus
from sources.base import Ranked, SourceContext
from tests.toy_sources import CatalogSource, HistoryEcho, ListParams, ListSource

TOY_SOURCES = [
    {"name": "lists", "kind": "tests.toy_sources:ListSource", "params": {"items": [11, 12, 13]}},
    {"name": "echo", "kind": "tests.toy_sources:HistoryEcho"},
    {"name": "pop", "kind": "tests.toy_sources:CatalogSource", "weight": 0.1, "params": {"n": 60}},
]


def toy_config(**overrides: Any) -> RetrievalConfig:
    fallback = "pop" if "sources" not in overrides else None
    raw: dict[str, Any] = {
        "k": 8,
        "deadline_ms": 2000,
        "blend": {"strategy": "rrf", "exclude_seen": True, "fallback": fallback},
        "sources": TOY_SOURCES,
    }
    raw.update(overrides)
    return RetrievalConfig.load(raw)


def toy_blender(**kw: Any) -> Blender:
    ctx = SourceContext()
    return Blender(
        [
            SourceSlot(ListSource("lists", ListParams(items=[11, 12, 13]), ctx)),
            SourceSlot(HistoryEcho("echo", HistoryEcho.Params(), ctx)),
            SourceSlot(CatalogSource("pop", CatalogSource.Params(n=60), ctx), weight=0.1),
        ],
        **{"k": 8, "deadline_ms": 2000, "fallback": "pop", **kw},
    )


def same(a: CandidateSet, b: CandidateSet) -> None:
    assert a.item_ids.tolist() == b.item_ids.tolist()
    assert np.array_equal(a.scores, b.scores)
    assert np.array_equal(a.ranks, b.ranks)
    assert a.backfilled == b.backfilled
    assert a.store_status == b.store_status
    assert [(r.name, r.status, r.returned, r.survived) for r in a.reports] == [
        (r.name, r.status, r.returned, r.survived) for r in b.reports
    ]


# -- the steps and their order ---------------------------------------------------------------


def test_the_steps_are_named_in_order():
    assert STEPS == (
        "prepare",
        "gate",
        "fan_out",
        "wait",
        "collect",
        "require",
        "lists",
        "merge",
        "backfill",
        "result",
    )
    assert SERVING_STEPS == (
        "request",
        "gate",
        "prepare",
        "cache_get",
        "blend",
        "finish",
        "cache_put",
    )
    for name in STEPS:
        methods = ("_wait", "_await") if name == "wait" else (f"_{name}",)
        for method in methods:
            assert callable(getattr(Blender, method)), method


def _record_blender_steps(b: Blender, seen: list[str]) -> None:
    """Wrap each step method of ``b`` (on the instance) so that running it records its name."""

    def wrap(name: str, fn: Any) -> Any:
        if asyncio.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def arecord(*args: Any) -> Any:
                seen.append(name)
                return await fn(*args)

            return arecord

        @functools.wraps(fn)
        def record(*args: Any) -> Any:
            seen.append(name)
            return fn(*args)

        return record

    for name in STEPS:
        for method in ("_wait", "_await") if name == "wait" else (f"_{name}",):
            setattr(b, method, wrap(name, getattr(b, method)))


@pytest.mark.parametrize("mode", ["blend", "ablend"])
def test_blend_and_ablend_run_every_step_in_order(mode):
    b = toy_blender()
    try:
        seen: list[str] = []
        _record_blender_steps(b, seen)
        req = Request(history=(1, 2), exclude=frozenset({12}))
        res = b.blend(req) if mode == "blend" else asyncio.run(b.ablend(req))
        assert seen == list(STEPS)
        assert len(res) == 8
    finally:
        b.close()


def _record_serving_steps(r: Retriever, seen: list[str], monkeypatch) -> None:
    as_request = retriever_module._as_request

    def request_step(*args: Any) -> Request:
        seen.append("request")
        return as_request(*args)

    monkeypatch.setattr(retriever_module, "_as_request", request_step)
    for name in ("gate", "prepare", "cache_get", "finish", "cache_put"):
        fn = getattr(r, f"_{name}")
        setattr(
            r, f"_{name}", functools.partial(lambda n, f, *a: seen.append(n) or f(*a), name, fn)
        )
    blender = r.blender
    run, arun = blender.run, blender.arun

    def blend_step(ctx: BlendContext) -> CandidateSet:
        seen.append("blend")
        return run(ctx)

    async def ablend_step(ctx: BlendContext) -> CandidateSet:
        seen.append("blend")
        return await arun(ctx)

    blender.run = blend_step  # type: ignore[method-assign]
    blender.arun = ablend_step  # type: ignore[method-assign]


@pytest.mark.parametrize("mode", ["blend", "ablend"])
def test_the_retriever_runs_its_steps_in_order(mode, monkeypatch):
    with Retriever(toy_config(store={"cache_ttl_s": 60})) as r:
        seen: list[str] = []
        _record_serving_steps(r, seen, monkeypatch)

        def call() -> CandidateSet:
            if mode == "blend":
                return r.blend(user_id="u", history=[3])
            return asyncio.run(r.ablend(user_id="u", history=[3]))

        first = call()
        assert seen == list(SERVING_STEPS)
        assert not first.cache_hit
        seen.clear()
        deadline = time.monotonic() + 5  # the cache write runs off the request path
        while not (hit := call()).cache_hit and time.monotonic() < deadline:
            seen.clear()
            time.sleep(0.01)
        assert hit.cache_hit
        assert seen == ["request", "gate", "prepare", "cache_get", "finish"]  # a hit ends early


# -- one core: blend and ablend agree ----------------------------------------------------------


REQUESTS = [
    Request(),
    Request(user_id=1, history=(1, 2, 7)),
    Request(user_id=2, history=(3,), exclude=frozenset({11, 1003, 5}), k=5),
    Request(seed_items=(4,), k=30),
]


@pytest.mark.parametrize("req", REQUESTS, ids=range(len(REQUESTS)))
def test_blender_blend_and_ablend_give_identical_results(req):
    b = toy_blender()
    try:
        same(b.blend(req), asyncio.run(b.ablend(req)))
    finally:
        b.close()


@pytest.mark.parametrize("req", REQUESTS, ids=range(len(REQUESTS)))
def test_retriever_blend_and_ablend_give_identical_results(req):
    with Retriever(toy_config()) as r:
        r.record(1, 9)  # the store fills in a history where the request has none
        sync = r.blend(req)
        async_ = asyncio.run(r.ablend(req))
        same(sync, async_)
        assert all(rep.status is not SourceStatus.TIMEOUT for rep in sync.reports)


def test_keywords_and_a_request_blend_alike():
    with Retriever(toy_config()) as r:
        by_keywords = r.blend(user_id=2, history=[3], exclude=[11, 1003, 5], k=5)
        by_request = r.blend(
            Request(user_id=2, history=(3,), exclude=frozenset({11, 1003, 5}), k=5)
        )
        same(by_keywords, by_request)
        assert by_keywords.item_ids.tolist() == [12, 13, 1, 2, 4]  # 3, 5, 11, 1003 excluded


# -- the typed facade --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def retriever():
    with Retriever(toy_config()) as r:
        yield r


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"usr_id": 1}, TypeError, "usr_id"),
        ({"k": "many"}, InputError, "k must be an int from 1 to"),
        ({"k": True}, InputError, "k must be an int from 1 to"),
        ({"k": 0}, InputError, "k must be an int from 1 to"),
        ({"k": 2.0}, InputError, "k must be an int from 1 to"),
        ({"k": 10**9}, InputError, "k must be an int from 1 to 1,000,000"),
        ({"deadline_ms": float("nan")}, InputError, "deadline_ms must be"),
        ({"deadline_ms": float("inf")}, InputError, "deadline_ms must be"),
        ({"deadline_ms": -5}, InputError, "deadline_ms must be"),
        ({"deadline_ms": "30"}, InputError, "deadline_ms must be"),
        ({"deadline_ms": False}, InputError, "deadline_ms must be"),
        ({"context": {"country": 1}}, InputError, "context"),
        ({"context": {1: "de"}}, InputError, "context"),
        ({"context": [("country", "de")]}, InputError, "context must be a mapping"),
        ({"history": "abc"}, InputError, "history"),
        ({"seed_items": 7}, InputError, "seed_items"),
        ({"exclude": 5}, InputError, "exclude"),
        ({"user_id": True}, InputError, "user_id"),
        ({"user_id": 1.5}, InputError, "user_id"),
        ({"vector": ["x", "y"]}, InputError, "vector"),
        ({"request": Request(), "k": 5}, InputError, "not both: got request and k="),
        ({"request": {"user_id": 1}}, InputError, "request must be a retrieval.Request"),
        ({"request": Request(k=True)}, InputError, "request.k must be an int from 1 to"),  # type: ignore[arg-type]
    ],
)
def test_the_facade_refuses_wrong_arguments_by_name(retriever, kwargs, error, names):
    with pytest.raises(error, match=names):
        retriever.blend(**kwargs)
    with pytest.raises(error, match=names):
        asyncio.run(retriever.ablend(**kwargs))
    with pytest.raises(error, match=names):
        retriever.request(**kwargs)
    with pytest.raises(error, match=names):
        blend(retriever, **kwargs)


def test_module_level_blend_checks_its_arguments_before_loading(tmp_path):
    missing = tmp_path / "nowhere.yaml"  # never read: the arguments are refused first
    with pytest.raises(TypeError, match="usr_id"):
        blend(missing, usr_id=1)  # type: ignore[call-arg]
    with pytest.raises(InputError, match="k must be an int from 1 to"):
        blend(missing, k="many")  # type: ignore[arg-type]


def test_the_facade_takes_numpy_numbers_and_plain_ids(retriever):
    res = retriever.blend(user_id=np.int64(3), k=np.int64(4), deadline_ms=np.float32(500.0))  # type: ignore[arg-type]
    assert len(res) == 4
    req = retriever.request(user_id=np.int64(3), exclude={1, "sku-1"}, context={"country": "DE"})
    assert req.user_id == 3 and type(req.user_id) is int
    assert req.exclude == frozenset({1, "sku-1"}) and req.context == {"country": "DE"}


# -- k and the deadline, derived once -----------------------------------------------------------


class Spy(ListSource):
    """Records what each call was asked for."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.asked: list[tuple[int, float, int | None]] = []

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        self.asked.append((k, deadline.remaining_ms(), request.k))
        return super().retrieve(request, k, deadline)


SPY_SOURCES = [{"name": "spy", "kind": "tests.test_pipeline:Spy", "params": {"items": [1, 2, 3]}}]


def test_k_and_deadline_from_the_call_reach_every_step():
    with Retriever(toy_config(sources=SPY_SOURCES, k=1000, deadline_ms=2000)) as r:
        spy = r.sources[0]
        assert isinstance(spy, Spy)
        reads: list[float] = []
        fetch = r.store.fetch
        r.store.fetch = lambda *a, **kw: reads.append(kw["timeout_ms"]) or fetch(*a, **kw)  # type: ignore[method-assign]
        spy.asked.clear()  # the warm-up's call
        res = r.blend(user_id="u", k=5, deadline_ms=80)
        (k_asked, left_ms, request_k) = spy.asked[-1]
        assert k_asked == 5 and request_k == 5  # not the config's 1000
        assert 0 < left_ms <= 80
        # The store read had the same deadline (with the config's, the 100 ms socket timeout).
        assert reads and 0 < reads[-1] <= 80
        assert len(res) == 3 and res.elapsed_ms < 1000
        # Exclusions (the request's and the store's history) deepen the ask by their size.
        r.record("u", 7)
        r.blend(user_id="u", k=5, deadline_ms=80, exclude=[1, 2])
        assert spy.asked[-1][0] == 5 + 3
        # Without them in the call, the config's values apply.
        r.blend(user_id="w")
        k_asked, left_ms, request_k = spy.asked[-1]
        assert k_asked == 1000 and request_k is None and 80 < left_ms <= 2000


def test_a_slow_store_read_comes_out_of_the_deadline_not_out_of_a_source_timeout():
    sources = [{**SPY_SOURCES[0], "timeout_ms": 300}]
    with Retriever(toy_config(sources=sources, deadline_ms=2000)) as r:
        spy = r.sources[0]
        assert isinstance(spy, Spy)
        fetch = r.store.fetch

        def slow_fetch(*a: Any, **kw: Any) -> Any:
            time.sleep(0.1)
            return fetch(*a, **kw)

        r.store.fetch = slow_fetch  # type: ignore[method-assign]
        spy.asked.clear()
        r.blend(user_id="u", deadline_ms=600)
        # The caller's 600 ms began before the 100 ms read: the source had at most 500 left.
        assert 0 < spy.asked[-1][1] <= 500
        r.blend(user_id="u", deadline_ms=1500)
        # Its own 300 ms timeout counts from the fan-out, after the read: nearly all of it left.
        assert 200 < spy.asked[-1][1] <= 300


def test_combine_derives_k_and_the_exclusions_like_blend():
    b = toy_blender()
    try:
        req = Request(user_id=2, history=(3,), exclude=frozenset({11, 1003, 5}), k=5)
        live = b.blend(req)
        k_ask = 5 + 4  # k plus the request's and the history's exclusions
        answers = [s.source.retrieve(req, k_ask, Deadline.in_ms(1000)) for s in b.slots]
        ids, scores, ranks, backfilled = b.combine(req, answers)
        assert ids.tolist() == live.item_ids.tolist()
        assert np.array_equal(ranks, live.ranks) and backfilled == live.backfilled
        assert math.isclose(float(scores[0]), float(live.scores[0]))
    finally:
        b.close()


def test_the_heap_stays_frozen_while_any_retriever_is_open():
    """A full collection walked the ~140k objects numba's and faiss's imports leave (~75 ms
    with every thread stopped): an open retriever keeps them frozen (gc.freeze), and the last
    one to close gives them back to the collector."""
    import gc

    from retrieval.online import retriever as retriever_module

    before = retriever_module._frozen
    first = Retriever(toy_config())
    assert retriever_module._frozen == before + 1 and gc.get_freeze_count() > 0
    second = Retriever(toy_config())
    first.close()
    first.close()  # a second close changes nothing
    assert retriever_module._frozen == before + 1 and gc.get_freeze_count() > 0
    second.close()
    assert retriever_module._frozen == before
    if before == 0:
        assert gc.get_freeze_count() == 0
