"""Serving with a store: config, the one-round-trip hot path, the result cache, pushed neighbour
lists, and blend() under Redis failures (closed port, stopped server, slow server).

Shared-server tests use unique ``test-<uuid>`` prefixes that are deleted afterwards; every fault
is injected on a throwaway ``redis-server`` of its own.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from retrieval import Retriever
from retrieval.config import ConfigError, RetrievalConfig, load_config
from retrieval.offline.push import push
from retrieval.store import Event, StoreUnavailable
from retrieval.store.cache import CacheFormatError, decode_result, encode_result
from retrieval.store.redis_store import RedisStore
from retrieval.store.rows import RowFormatError, pack_row, unpack_row
from retrieval.tools.cli import main
from retrieval.tools.synth import synthesize
from retrieval.types import CandidateSet, Deadline, Request, SourceReport, SourceStatus
from tests.test_store_redis import Server, delete_prefix, free_port, redis_url  # noqa: F401


@pytest.fixture
def shared_url(redis_url: str) -> str:  # noqa: F811
    """The shared server (or a module-wide throwaway one), as tests/test_store_redis.py has it."""
    return redis_url


DEADLINE_MS = 50.0
GRACE_S = 0.15  # wall-clock slack on top of the deadline on a shared machine

SOURCES = """
  - name: covisit
    kind: covisitation
    params: {{window: 5, top_k: 30, backend: {backend}}}
  - name: itemcf
    kind: itemcf
    params: {{neighbours: 30, backend: {backend}}}
  - name: popular
    kind: popularity
    weight: 0.2
    params: {{segments: [country]}}
"""


def write_config(
    path: Path, artifacts: Path, store: str = "{kind: memory}", backend: str = "local", **top: Any
) -> Path:
    head = {"k": 50, "deadline_ms": DEADLINE_MS, "artifacts": str(artifacts), **top}
    text = "".join(f"{k}: {json.dumps(v)}\n" for k, v in head.items())
    text += "events: {segments: [country]}\n"
    text += "blend: {strategy: rrf, exclude_seen: true, fallback: popular}\n"
    text += f"store: {store}\nsources:\n" + textwrap.dedent(SOURCES).format(backend=backend)
    path.write_text(text)
    return path


def redis_store_yaml(url: str, prefix: str, **extra: Any) -> str:
    fields = {"kind": "redis", "url": url, "prefix": prefix, **extra}
    return json.dumps(fields)


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two builds (A, B) of one config on two logs: what a push switches between."""
    from retrieval.offline.build import build

    root = tmp_path_factory.mktemp("serving")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        log = root / f"{name}.parquet"
        synthesize(log, n_items=800, n_users=200, n_events=5000, seed=seed)
        cfg = load_config(write_config(root / f"{name}.yaml", root / f"build-{name}"))
        build(cfg, log, root / f"build-{name}", progress=False)
        out[name] = root / f"build-{name}"
        out[f"{name}-log"] = log
    return out


def some_history(builds: dict[str, Path], n: int = 6) -> list[int]:
    ids = np.load(builds["a"] / "ids" / "items.npy")
    return [int(x) for x in ids[10 : 10 + n]]


@pytest.fixture
def prefix(shared_url: str) -> Iterator[str]:
    p = f"test-{uuid.uuid4().hex}"
    yield p
    delete_prefix(shared_url, p)


# -- config ------------------------------------------------------------------------------------


def test_store_config_fields_env_override_and_redaction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = {
        "store": {"kind": "redis", "url": "${REDIS_URL}", "cache_ttl_s": 5, "buffer_events": 9},
        "sources": [{"name": "x", "kind": "tests.toy_sources:ListSource"}],
    }
    cfg = RetrievalConfig.load(doc, environ={"REDIS_URL": "redis://a:1/0"})
    assert cfg.store.url == "redis://a:1/0" and cfg.store.cache_ttl_s == 5
    env = {"REDIS_URL": "redis://a:1/0", "RETRIEVAL_REDIS_URL": "redis://b:2/3"}
    assert RetrievalConfig.load(doc, environ=env).store.url == "redis://b:2/3"
    no_url = {**doc, "store": {"kind": "redis"}}
    with pytest.raises(ConfigError, match="RETRIEVAL_REDIS_URL"):
        RetrievalConfig.load(no_url, environ={})
    assert RetrievalConfig.load(no_url, environ={"RETRIEVAL_REDIS_URL": "redis://c"}).store.url
    assert RetrievalConfig.load(doc, environ={"REDIS_URL": "x"}).store.cache_ttl_s == 5
    assert RetrievalConfig.load({"sources": doc["sources"]}).store.cache_ttl_s == 0  # off
    with pytest.raises(ConfigError, match="backend"):
        RetrievalConfig.load(
            {"sources": [{"name": "c", "kind": "covisitation", "params": {"backend": "s3"}}]}
        )

    path = tmp_path / "c.yaml"
    path.write_text(
        "store: {kind: redis, url: 'redis://u:hunter2@h:6379/0'}\n"
        "sources: [{name: x, kind: 'tests.toy_sources:ListSource'}]\n"
    )
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr()
    assert "hunter2" not in out.out + out.err and "u:***@h" in out.out


def test_redis_backend_needs_a_redis_store(tmp_path: Path, builds: dict[str, Path]) -> None:
    cfg = write_config(tmp_path / "c.yaml", builds["a"], backend="redis")
    with pytest.raises(ConfigError, match="backend"):
        Retriever.from_yaml(cfg)


# -- the hot path ----------------------------------------------------------------------------


def _count_round_trips(store: RedisStore) -> list[int]:
    calls = [0]
    real = store._roundtrip

    def counted(cmds: Any, timeout_s: Any) -> Any:
        calls[0] += 1
        return real(cmds, timeout_s)

    store._roundtrip = counted  # type: ignore[method-assign]
    return calls


def test_blend_reads_the_store_once_and_matches_the_memory_store(
    tmp_path: Path,
    builds: dict[str, Path],
    shared_url: str,
    prefix: str,
) -> None:
    hist = some_history(builds)
    fresh = 987_654_321  # never in the build: only the live counters know it
    events = [Event("u1", item, time.time() - 10 + i) for i, item in enumerate(hist)]
    events += [Event("v", fresh, time.time(), "order", {"country": "DE"}) for _ in range(50)]
    results = {}
    for kind in ("memory", "redis"):
        store = "{kind: memory}" if kind == "memory" else redis_store_yaml(shared_url, prefix)
        cfg = write_config(tmp_path / f"{kind}.yaml", builds["a"], store=store)
        with Retriever.from_yaml(cfg) as r:
            r.record_many(events)
            calls = _count_round_trips(r.store) if kind == "redis" else [0]  # type: ignore[arg-type]
            res = r.blend(user_id="u1", context={"country": "DE"})
            assert res.store_status == "ok" and not res.cache_hit
            if kind == "redis":
                assert calls[0] == 1, "history + live popular lists must be one round trip"
            assert res.report("covisit").status is SourceStatus.OK
            cold = r.blend(user_id="cold", context={"country": "DE"})
            assert cold.item_ids[0] == fresh  # live counts reached the popularity source
            assert not set(hist) & set(res.item_ids.tolist())  # history came from the store
            results[kind] = res
    np.testing.assert_array_equal(results["memory"].item_ids, results["redis"].item_ids)
    np.testing.assert_allclose(results["memory"].scores, results["redis"].scores, rtol=1e-5)


def test_popularity_source_does_not_read_the_store(builds: dict[str, Path]) -> None:
    from sources.base import SourceContext
    from sources.popularity import PopularityParams, PopularitySource

    class Exploding:
        def history(self, *a: Any, **kw: Any) -> Any:
            raise AssertionError("no store reads inside retrieve")

        popular = history

    p = PopularityParams(segments=["country"])
    src = PopularitySource("popular", p, SourceContext(builds["a"], store=Exploding()))
    ids, _ = src.retrieve(Request(context={"country": "DE"}), 10, Deadline.in_ms(50))
    assert ids.size == 10


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_result_cache(
    kind: str,
    tmp_path: Path,
    builds: dict[str, Path],
    shared_url: str,
    prefix: str,
) -> None:
    store = "{kind: memory, cache_ttl_s: 30}"
    if kind == "redis":
        store = redis_store_yaml(shared_url, prefix, cache_ttl_s=30)
    cfg = write_config(tmp_path / "c.yaml", builds["a"], store=store)
    hist = some_history(builds)
    with Retriever.from_yaml(cfg) as r:
        r.record_many([Event("u", item, time.time() - 10 + i) for i, item in enumerate(hist)])
        first = r.blend(user_id="u", context={"country": "DE"})
        assert not first.cache_hit
        second = _until(lambda: r.blend(user_id="u", context={"country": "DE"}), "cache_hit")
        assert second.cache_hit and second.store_status == "ok"
        np.testing.assert_array_equal(first.item_ids, second.item_ids)
        np.testing.assert_array_equal(first.ranks, second.ranks)
        assert second.to_dict()["cache_hit"] is True
        assert not r.blend(user_id="u", context={"country": "FR"}).cache_hit  # other shape
        assert not r.blend(user_id="u", context={"country": "DE"}, k=7).cache_hit
        assert not r.blend(user_id="u", context={"country": "DE"}, exclude=[hist[0]]).cache_hit
        r.record("u", hist[0])  # new history: a new key
        assert not r.blend(user_id="u", context={"country": "DE"}).cache_hit


def _until(fn: Any, attr: str, tries: int = 50) -> Any:
    """The cache write runs off the request path: give it a moment."""
    for _ in range(tries):
        out = fn()
        if getattr(out, attr):
            return out
        time.sleep(0.01)
    return out


def test_cached_result_encoding_round_trips_and_rejects_garbage() -> None:
    for ids in (np.array([3, 1, 2], dtype=np.int64), np.array(["a", "\u00fc-long", ""])):
        res = CandidateSet(
            item_ids=ids,
            scores=np.array([0.5, 0.25, 0.125], dtype=np.float32),
            source_names=("x", "y"),
            ranks=np.array([[0, -1], [1, 0], [-1, 1]], dtype=np.int32),
            reports=(
                SourceReport("x", SourceStatus.OK, 1.5, 2, 2),
                SourceReport("y", SourceStatus.OK),
            ),
            backfilled=1,
        )
        blob = encode_result(res)
        assert b"pickle" not in blob
        back = decode_result(blob)
        np.testing.assert_array_equal(back.item_ids, res.item_ids)
        assert back.item_ids.dtype.kind == ids.dtype.kind
        np.testing.assert_array_equal(back.ranks, res.ranks)
        assert back.reports[0].to_dict() == res.reports[0].to_dict()
        for bad in (b"", b"junk", blob[:-1], blob + b"x", b"CRCS\x01" + blob[5:20]):
            with pytest.raises(CacheFormatError):
                decode_result(bad)


# -- pushed neighbour lists ------------------------------------------------------------------


def test_rows_format_round_trips_and_validates() -> None:
    for ids in (np.array([5, -2, 2**40]), np.array(["sku-1", "\u00fc", ""])):
        blob = pack_row(ids, np.array([3.0, 2.0, 1.0]))
        got_ids, got_scores = unpack_row(blob)
        assert got_ids.tolist() == ids.tolist() and got_scores.dtype == np.float32
    blob = pack_row(np.array([1, 2]), np.array([1.0, 0.5]))
    bad = [
        b"",
        b"x" * 40,
        blob[:-1],
        blob + b"\x00",
        b"XXXX" + blob[4:],
        blob[:4] + b"\x09" + blob[5:],
    ]
    for value in bad:
        with pytest.raises(RowFormatError):
            unpack_row(value)


def _remote_config(tmp: Path, build: Path, url: str, prefix: str) -> Path:
    """Neighbour sources from Redis; popularity still local (so an artifacts dir remains)."""
    return write_config(
        tmp / "remote.yaml", build, store=redis_store_yaml(url, prefix), backend="redis"
    )


def test_push_then_serve_from_redis_equals_local(
    tmp_path: Path,
    builds: dict[str, Path],
    shared_url: str,
    prefix: str,
) -> None:
    local_cfg = write_config(tmp_path / "local.yaml", builds["a"])
    remote_cfg = _remote_config(tmp_path, builds["a"], shared_url, prefix)
    assert main(["push", str(remote_cfg), "--artifacts", str(builds["a"])]) == 0
    client = redis.Redis.from_url(shared_url)
    assert client.get(f"{prefix}:nb:current:covisit") is not None
    assert client.get(f"{prefix}:nb:current:popular") is None  # nothing reads popularity there
    assert not list(client.scan_iter(match=f"{prefix}:nb:*:popular:*"))
    hist = some_history(builds)
    with Retriever.from_yaml(local_cfg) as lr, Retriever.from_yaml(remote_cfg) as rr:
        for h in (hist, hist[:1], [hist[2], 10**12]):
            a = lr.blend(history=h, deadline_ms=500)
            b = rr.blend(history=h, deadline_ms=500)
            assert b.store_status == "ok"
            for name in ("covisit", "itemcf"):
                assert b.report(name).status is SourceStatus.OK and b.report(name).returned
            np.testing.assert_array_equal(a.item_ids, b.item_ids)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
        # a corrupted row is skipped and reported, never a crash
        version = client.get(f"{prefix}:nb:current:covisit").decode()
        client.set(f"{prefix}:nb:{version}:covisit:{hist[-1]}", b"CRNR\x07garbage")
        failures = rr.store.failures  # type: ignore[attr-defined]
        res = rr.blend(history=hist, deadline_ms=500)
        assert res.store_status == "degraded" and len(res) == 50
        assert res.report("covisit").status is SourceStatus.OK  # the other rows still serve
        assert rr.store.failures == failures + 1  # type: ignore[attr-defined]
    # a second push replaces the version and deletes the old rows
    old_keys = len(list(client.scan_iter(match=f"{prefix}:nb:{version}:*")))
    assert old_keys > 0
    assert main(["push", str(remote_cfg), "--artifacts", str(builds["a"]), "--only", "itemcf"]) == 0
    assert (
        main(["push", str(remote_cfg), "--artifacts", str(builds["a"]), "--only", "covisit"]) == 0
    )
    assert not list(client.scan_iter(match=f"{prefix}:nb:{version}:covisit:*"))
    client.close()


def test_a_push_while_readers_blend_is_seen_whole(
    tmp_path: Path,
    builds: dict[str, Path],
    shared_url: str,
    prefix: str,
) -> None:
    """Readers get build A's answer or build B's, never a mix of the two versions' rows."""
    cfg = load_config(_remote_config(tmp_path, builds["a"], shared_url, prefix))
    hist = some_history(builds, 12)
    expected = {}
    for name in ("a", "b"):
        with Retriever.from_yaml(write_config(tmp_path / f"{name}.yaml", builds[name])) as r:
            src = next(s for s in r.sources if s.name == "covisit")
            ids, _ = src.retrieve(Request(history=tuple(hist)), 50, Deadline.in_ms(1000))
            expected[name] = ids.tolist()
    assert expected["a"] != expected["b"]
    push(cfg, builds["a"], shared_url, only=["covisit"])
    seen: dict[str, int] = {"a": 0, "b": 0}
    bad: list[Any] = []
    stop = threading.Event()
    with Retriever(cfg) as r:
        src = next(s for s in r.sources if s.name == "covisit")

        def read() -> None:
            while not stop.is_set():
                ids, _ = src.retrieve(Request(history=tuple(hist)), 50, Deadline.in_ms(1000))
                got = ids.tolist()
                match = [n for n, want in expected.items() if got == want]
                if match:
                    seen[match[0]] += 1
                else:
                    bad.append(got)

        readers = [threading.Thread(target=read) for _ in range(4)]
        for t in readers:
            t.start()
        try:
            for name in ("b", "a", "b", "a", "b"):
                push(cfg, builds[name], shared_url, only=["covisit"])
        finally:
            stop.set()
            for t in readers:
                t.join()
    assert not bad, f"{len(bad)} mixed or empty answers"
    assert seen["a"] and seen["b"], seen


# -- failures (throwaway servers) ------------------------------------------------------------


def _within_deadline(r: Retriever, **kw: Any) -> Any:
    t = time.monotonic()
    res = r.blend(**kw)
    took = time.monotonic() - t
    assert took < DEADLINE_MS / 1000 + GRACE_S, f"blend took {took * 1000:.0f} ms"
    return res


def _degraded_but_served(res: Any) -> None:
    assert res.store_status == "degraded"
    assert res.to_dict(with_candidates=False)["store"] == "degraded"
    assert len(res) == 50  # the local fallback fills the slate
    assert res.report("popular").status is SourceStatus.OK


def test_closed_port_blends_within_the_deadline_and_record_raises(
    tmp_path: Path, builds: dict[str, Path]
) -> None:
    url = f"redis://:pa55w0rd@127.0.0.1:{free_port()}/0"
    cfg = write_config(tmp_path / "c.yaml", builds["a"], store=redis_store_yaml(url, "t"))
    with Retriever.from_yaml(cfg) as r:
        for _ in range(3):
            _degraded_but_served(_within_deadline(r, user_id="u", context={"country": "DE"}))
        # with history passed in, local neighbour sources still answer
        res = _within_deadline(r, user_id="u", history=some_history(builds))
        assert res.report("covisit").status is SourceStatus.OK and res.report("covisit").returned
        res = asyncio.run(asyncio.wait_for(r.ablend(user_id="u"), DEADLINE_MS / 1000 + GRACE_S))
        _degraded_but_served(res)
        with pytest.raises(StoreUnavailable) as info:
            r.record("u", 1)
        assert "pa55w0rd" not in str(info.value) and "***" in str(info.value)
    buffered = redis_store_yaml(url, "t", buffer_events=100)
    cfg = write_config(tmp_path / "b.yaml", builds["a"], store=buffered)
    with Retriever.from_yaml(cfg) as r:
        r.record("u", 1)  # buffered, not raised
        assert r.store.buffered == 1  # type: ignore[attr-defined]


def test_server_stopped_mid_test_then_back(tmp_path: Path, builds: dict[str, Path]) -> None:
    server = Server().start()
    try:
        store = redis_store_yaml(server.url, "t", socket_timeout_ms=200)
        cfg = write_config(tmp_path / "c.yaml", builds["a"], store=store)
        hist = some_history(builds)
        with Retriever.from_yaml(cfg) as r:
            r.record_many([Event("u", h, time.time() - 10 + i) for i, h in enumerate(hist)])
            assert _within_deadline(r, user_id="u").store_status == "ok"
            server.stop()
            for _ in range(3):
                _degraded_but_served(_within_deadline(r, user_id="u"))
            with pytest.raises(StoreUnavailable):
                r.record("u", hist[0])
            server.start()
            r.record("u", hist[0])  # the pool reconnects by itself
            res = _within_deadline(r, user_id="u")
            assert res.store_status == "ok" and res.report("covisit").status is SourceStatus.OK
    finally:
        server.stop()


def test_slow_server_blends_within_the_deadline(tmp_path: Path, builds: dict[str, Path]) -> None:
    server = Server().start()
    try:
        store = redis_store_yaml(server.url, "t", socket_timeout_ms=500)
        cfg = write_config(tmp_path / "c.yaml", builds["a"], store=store)
        with Retriever.from_yaml(cfg) as r:
            r.record("u", some_history(builds)[0])
            assert _within_deadline(r, user_id="u").store_status == "ok"
            blocker = redis.Redis(port=server.port, socket_timeout=5)
            sleeping = threading.Thread(
                target=blocker.execute_command, args=("DEBUG", "SLEEP", 0.6)
            )
            sleeping.start()
            time.sleep(0.05)
            for _ in range(3):
                _degraded_but_served(_within_deadline(r, user_id="u"))
            sleeping.join()
            blocker.close()
            assert _within_deadline(r, user_id="u").store_status == "ok"
    finally:
        server.stop()


def test_redis_backend_sources_fail_open_when_redis_is_down(
    tmp_path: Path, builds: dict[str, Path]
) -> None:
    server = Server().start()
    try:
        cfg = _remote_config(tmp_path, builds["a"], server.url, "t")
        push(load_config(cfg), builds["a"], server.url)
        hist = some_history(builds)
        with Retriever.from_yaml(cfg) as r:
            ok = _within_deadline(r, history=hist)
            assert ok.store_status == "ok" and ok.report("covisit").returned
            server.stop()
            res = _within_deadline(r, history=hist)
            _degraded_but_served(res)
            assert res.report("covisit").returned == 0
            assert res.report("covisit").status is SourceStatus.ERROR  # not "ok, 0 returned"
    finally:
        server.stop()
