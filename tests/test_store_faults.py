"""Findings of the hostile-input review of the online stores, each pinned by a test that failed
before its fix. Store behaviour both backends share lives in ``tests/store_suite.py``; these are
the Redis-side ones, on the shared Redis under unique ``test-<uuid>`` prefixes (deleted after)
or on throwaway ``redis-server``s of their own for faults.
"""

from __future__ import annotations

import json
import subprocess
import sys
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
from retrieval.config import RetrievalConfig
from retrieval.errors import IdError, InputError, StoreError
from retrieval.offline.push import PUSHABLE_KINDS, push
from retrieval.store import Event, StoreUnavailable
from retrieval.store.redis_store import RedisStore
from retrieval.store.rows import pack_row
from retrieval.types import DEFAULT_EVENT_WEIGHTS, Deadline, Request, SourceStatus
from sources.base import Source
from sources.covisitation import CovisitationParams, CovisitationSource
from tests.store_suite import RawEvent
from tests.test_store_redis import Server, delete_prefix, free_port, redis_url  # noqa: F401
from tests.toy_sources import ListSource


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:  # noqa: F811
    p = f"test-{uuid.uuid4().hex}"
    yield p
    delete_prefix(redis_url, p)


@pytest.fixture
def store(redis_url: str, prefix: str) -> Iterator[RedisStore]:  # noqa: F811
    with RedisStore(redis_url, prefix=prefix, socket_timeout_ms=500) as s:
        yield s


class LivePopular(ListSource):
    """A list source that also asks for the global live popular list, as popularity does."""

    def live_popular(self, request: Request, k: int) -> tuple[Any, int]:
        return (None,), k


def write_config(path: Path, store: dict[str, Any], sources: str, **top: Any) -> Path:
    head = {"k": 5, "deadline_ms": 200, **top, "store": store}
    text = "".join(f"{key}: {json.dumps(v)}\n" for key, v in head.items())
    path.write_text(text + "sources:\n" + textwrap.dedent(sources))
    return path


# -- 1. the buffer never loses an event --------------------------------------------------------


def test_buffered_numpy_ids_survive_the_drain() -> None:
    """The drain met a numpy.int64 id ("Object of type int64 is not JSON serializable") and the
    events it had popped vanished, with dropped = 0."""
    srv = Server()  # not started yet: Redis is down
    with RedisStore(srv.url, buffer_events=10, socket_timeout_ms=50) as store:
        now = time.time()
        store.record([Event(np.int64(1), np.int64(42), now)])
        store.record([Event(np.int64(1), np.int64(43), np.float64(now + 1), "cart")])
        assert store.buffered == 2
        srv.start()
        try:
            assert store.flush() == 0
            items, _, types = store.history(1)
            assert items == [42, 43] and types == ["click", "cart"]
            assert [type(x) for x in items] == [int, int]
            assert store.dropped == 0 and store.status() == "ok"
        finally:
            srv.stop()


def test_an_unexpected_error_while_draining_keeps_the_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing leaves the buffer before Redis has it, whatever fails while sending."""
    srv = Server()
    with RedisStore(srv.url, buffer_events=10, socket_timeout_ms=50) as store:
        now = time.time()
        for i in range(3):
            store.record([Event("u", i, now + i)])
        assert store.buffered == 3
        srv.start()
        try:
            real = store._write_commands

            def broken(events: Any) -> Any:
                raise TypeError("a bug while serialising")

            monkeypatch.setattr(store, "_write_commands", broken)
            assert store.flush() == 3  # kept, in order
            assert store.status() == "degraded"
            monkeypatch.setattr(store, "_write_commands", real)
            assert store.flush() == 0
            assert store.history("u")[0] == [0, 1, 2]
            assert store.dropped == 0 and store.uncertain == 0
        finally:
            srv.stop()


def test_a_bad_event_is_never_buffered() -> None:
    srv = Server()
    with RedisStore(srv.url, buffer_events=10, socket_timeout_ms=50) as store:
        now = time.time()
        with pytest.raises(IdError, match=r"events\[1\]\.item_id"):
            store.record([Event("u", "a", now), RawEvent("u", None, now)])
        with pytest.raises(InputError, match=r"events\[0\]\.timestamp.*\(milliseconds\?\)"):
            store.record([RawEvent("u", "a", now * 1000)])
        assert store.buffered == 0


def test_ids_that_cannot_be_key_names_are_refused_up_front(store: RedisStore) -> None:
    """A lone surrogate cannot be UTF-8 in a key name: refused at record(), never sent."""
    now = time.time()
    with pytest.raises(InputError, match=r"events\[1\]\.user_id.*UTF-8"):
        store.record([Event("u", "a", now), Event("bad-\ud800", "a", now)])
    with pytest.raises(InputError, match=r"events\[0\]\.context.*UTF-8"):
        store.record([Event("u", "a", now, context={"c": "\udfff"})])
    store.record([Event("u", "item-\ud800", now)])  # item ids are JSON: escaped, round-trip
    assert store.history("u")[0] == ["item-\ud800"]
    assert store.status() == "ok"


# -- 2/3. a bad event is refused at record time: every blend stays ok ---------------------------


def test_a_refused_event_keeps_every_blend_ok(tmp_path: Path, redis_url: str, prefix: str) -> None:  # noqa: F811
    """One None item used to reach the live popular list; every blend of every user that read
    it was then ``degraded``."""
    sources = """
      - name: popular
        kind: tests.test_store_faults:LivePopular
        params: {items: [1, 2, 3]}
    """
    store = {"kind": "redis", "url": redis_url, "prefix": prefix, "socket_timeout_ms": 500}
    cfg = write_config(tmp_path / "c.yaml", store, sources)
    with Retriever.from_yaml(cfg) as r:
        now = time.time()
        with pytest.raises(IdError):
            r.record("u", None)  # type: ignore[arg-type]
        with pytest.raises(IdError, match=r"events\[1\]\.item_id"):
            r.record_many([Event("u", 7, now), RawEvent("u", None, now)])  # type: ignore[list-item]
        with pytest.raises(InputError, match="milliseconds"):
            r.record("u", 7, timestamp=now * 1000)
        r.record("v", 9)
        for user in ("u", "v", "w"):
            res = r.blend(user_id=user)
            assert res.store_status == "ok", user
        assert r.request(user_id="w").live_popular == {None: ([9], pytest.approx([1.0], rel=1e-3))}


def test_a_huge_foreign_history_entry_is_skipped_within_the_deadline(
    tmp_path: Path,
    redis_url: str,  # noqa: F811
    prefix: str,
) -> None:
    """One 30 MB history entry blew the deadline and tripped every breaker for all users."""
    sources = """
      - name: popular
        kind: tests.test_store_faults:LivePopular
        params: {items: [1, 2, 3]}
    """
    store = {"kind": "redis", "url": redis_url, "prefix": prefix, "socket_timeout_ms": 500}
    cfg = write_config(tmp_path / "c.yaml", store, sources, deadline_ms=100)
    with Retriever.from_yaml(cfg) as r:
        r.record("u", 7)
        client = redis.Redis.from_url(redis_url)
        key = next(k for k in client.scan_iter(f"{prefix}:h:*"))
        client.lpush(key, json.dumps(["x" * 30_000_000, time.time(), "click"]))
        r.blend(user_id="u")  # the first read may pay for the transfer
        t0 = time.monotonic()
        res = r.blend(user_id="u")
        took_ms = (time.monotonic() - t0) * 1000
        assert res.store_status == "degraded"
        assert res.report("popular").status is SourceStatus.OK
        assert took_ms < 100 + 50, took_ms
        assert r.blend(user_id="v").store_status == "ok"  # other users are unharmed


def test_record_refuses_ids_longer_than_any_key_should_be(store: RedisStore) -> None:
    with pytest.raises(InputError, match="more than 1024"):
        store.record([Event("u", "x" * 2000, time.time())])
    with pytest.raises(InputError, match="event_type"):
        store.record([Event("u", 1, time.time(), "t" * 2000)])


# -- 4. foreign-typed keys: never a silent success ----------------------------------------------


@pytest.mark.parametrize("buffer_events", [0, 10])
@pytest.mark.parametrize("foreign", ["string-history", "hash-history", "string-counter"])
def test_a_write_into_a_foreign_typed_key_raises(
    redis_url: str,  # noqa: F811
    prefix: str,
    foreign: str,
    buffer_events: int,
) -> None:
    raw = redis.Redis.from_url(redis_url)
    with RedisStore(redis_url, prefix=prefix, buffer_events=buffer_events) as store:
        era = store._era(time.time())[0]
        if foreign == "string-history":
            raw.set(f"{prefix}:h:taken", "someone else's")
        elif foreign == "hash-history":
            raw.hset(f"{prefix}:h:taken", "field", "value")
        else:
            raw.set(store._pop_key(era, "_global"), "someone else's")
        with pytest.raises(StoreError, match="WRONGTYPE") as info:
            store.record([Event("taken", "a", time.time())])
        assert not isinstance(info.value, StoreUnavailable)
        assert "not resent" in str(info.value)
        assert store.status() == "degraded" and "WRONGTYPE" in (store.reason or "")
        assert store.buffered == 0  # not queued to be sent (and half-applied) again
        assert store.rejected == 1
        r = store.fetch("taken", [None], timeout_ms=500)
        assert not r.ok and store.status() == "degraded"  # the read says so too
    raw.close()


def test_a_buffered_batch_refused_by_redis_is_reported_not_resent() -> None:
    srv = Server()
    with RedisStore(srv.url, buffer_events=10, socket_timeout_ms=50) as store:
        store.record([Event("taken", "a", time.time()), Event("free", "b", time.time())])
        assert store.buffered == 2
        srv.start()
        try:
            raw = redis.Redis(port=srv.port)
            raw.set(f"{store.prefix}:h:taken", "x")
            with pytest.raises(StoreError, match="WRONGTYPE"):
                store.flush()
            assert store.buffered == 0 and store.rejected == 2
            assert store.history("free")[0] == ["b"]  # the batch's other commands applied
            raw.close()
        finally:
            srv.stop()


# -- 5. pushed neighbour rows: a failure is the source's error, counted by its breaker ----------


def _covisit(store: Any) -> CovisitationSource:
    from sources.base import SourceContext

    return CovisitationSource(
        "covisit", CovisitationParams(backend="redis"), SourceContext(None, store=store)
    )


def _ask(src: Source) -> tuple[Any, Any]:
    return src.retrieve(Request(history=(1, 2)), 10, Deadline.in_ms(500))


def test_nothing_pushed_is_an_error_that_says_run_push(store: RedisStore) -> None:
    with pytest.raises(StoreError, match=r"no pushed rows for 'covisit'.*run `retrieval push`"):
        _ask(_covisit(store))
    assert store.status() == "degraded"


def test_a_current_version_whose_rows_are_gone_is_an_error(
    store: RedisStore,
    redis_url: str,  # noqa: F811
) -> None:
    raw = redis.Redis.from_url(redis_url)
    raw.set(f"{store.prefix}:nb:current:covisit", "0123456789abcdef")  # rows deleted since
    with pytest.raises(
        StoreError, match=r"no pushed rows for version 0123456789abcdef of 'covisit'.*push`"
    ):
        _ask(_covisit(store))
    # with the version's marker, items without rows are just items without neighbours
    raw.set(f"{store.prefix}:nb:0123456789abcdef:covisit:", "0")
    ids, _ = _ask(_covisit(store))
    assert ids.size == 0 and store.status() == "ok"
    # rows without a marker (a push made before markers existed) still serve
    raw.delete(f"{store.prefix}:nb:0123456789abcdef:covisit:")
    raw.set(f"{store.prefix}:nb:0123456789abcdef:covisit:1", pack_row(np.array([5]), np.ones(1)))
    ids, _ = _ask(_covisit(store))
    assert 5 in ids.tolist() and store.status() == "ok"
    raw.close()


def test_a_foreign_push_mixing_id_kinds_is_an_error(
    store: RedisStore,
    redis_url: str,  # noqa: F811
) -> None:
    raw = redis.Redis.from_url(redis_url)
    raw.set(f"{store.prefix}:nb:current:covisit", "0123456789abcdef")
    raw.set(f"{store.prefix}:nb:0123456789abcdef:covisit:1", pack_row(np.array([5]), np.ones(1)))
    raw.set(f"{store.prefix}:nb:0123456789abcdef:covisit:2", pack_row(np.array(["x"]), np.ones(1)))
    with pytest.raises(StoreError, match="mix int and str"):
        _ask(_covisit(store))
    raw.close()


def test_redis_down_is_the_sources_error() -> None:
    with RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_ms=50) as store:
        with pytest.raises(StoreError, match="rows read"):
            _ask(_covisit(store))
        assert store.status() == "degraded"


def test_a_failing_redis_source_reports_error_and_opens_its_breaker(tmp_path: Path) -> None:
    """It reported ``ok`` with 0 returned, and its breaker counted a success."""
    server = Server().start()
    try:
        sources = """
          - name: covisit
            kind: covisitation
            params: {backend: redis}
          - name: pop
            kind: tests.toy_sources:CatalogSource
        """
        store = {"kind": "redis", "url": server.url, "prefix": "t", "socket_timeout_ms": 200}
        cfg = write_config(
            tmp_path / "c.yaml",
            store,
            sources,
            breaker={"failures": 2, "cooldown_s": 60},
            blend={"fallback": "pop"},
        )
        with Retriever.from_yaml(cfg) as r:
            first = r.blend(history=[1, 2])
            report = first.report("covisit")
            assert report.status is SourceStatus.ERROR and "run `retrieval push`" in str(
                report.error
            )
            assert first.store_status == "degraded" and len(first) == 5  # the fallback serves
            second = r.blend(history=[1, 2])
            assert second.report("covisit").status is SourceStatus.ERROR
            # two failures opened the breaker: the source is no longer called
            third = r.blend(history=[1, 2])
            assert third.report("covisit").status is SourceStatus.CIRCUIT_OPEN
            assert third.store_status == "ok" and len(third) == 5
    finally:
        server.stop()


def test_the_failure_counter_is_thread_safe(store: RedisStore) -> None:
    """``failures`` (read by the retriever around each blend) was a bare ``+= 1``."""
    n_threads, n_calls = 8, 5_000
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # make lost updates likely, if they can happen
    try:
        start = threading.Barrier(n_threads)

        def work() -> None:
            start.wait()
            for _ in range(n_calls):
                store._degrade("read", "injected")

        threads = [threading.Thread(target=work) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert store.failures == n_threads * n_calls
    with pytest.raises(AttributeError):
        store.failures = 0  # type: ignore[misc]  # read-only: only the store counts


# -- 6. a slow store read is the store's fault, not the sources' --------------------------------


def test_a_slow_store_read_is_degraded_not_a_source_timeout(tmp_path: Path) -> None:
    server = Server().start()
    try:
        sources = """
          - name: popular
            kind: tests.test_store_faults:LivePopular
            timeout_ms: 40
            params: {items: [1, 2, 3, 4, 5]}
        """
        store = {"kind": "redis", "url": server.url, "prefix": "t", "socket_timeout_ms": 100}
        cfg = write_config(
            tmp_path / "c.yaml", store, sources, deadline_ms=300, breaker={"failures": 1}
        )
        with Retriever.from_yaml(cfg) as r:
            assert r.blend(user_id="u").store_status == "ok"
            blocker = redis.Redis(port=server.port, socket_timeout=5)
            sleeping = threading.Thread(
                target=blocker.execute_command, args=("DEBUG", "SLEEP", 0.4)
            )
            sleeping.start()
            time.sleep(0.05)
            res = r.blend(user_id="u")  # the read times out after 100 ms, > popular's 40 ms
            sleeping.join()
            blocker.close()
            assert res.store_status == "degraded"
            assert res.report("popular").status is SourceStatus.OK
            # and its breaker did not open: the next blend still runs it
            assert r.blend(user_id="u").report("popular").status is SourceStatus.OK
    finally:
        server.stop()


# -- 7. one default event weight table, and serving does not import the event reader ------------


def test_the_default_weights_live_in_types_and_serving_does_not_import_pyarrow() -> None:
    import retrieval.offline.events

    assert retrieval.offline.events.DEFAULT_EVENT_WEIGHTS is DEFAULT_EVENT_WEIGHTS
    code = (
        "import sys, retrieval.store, retrieval.store.redis_store, retrieval.types\n"
        "bad = [m for m in ('retrieval.offline.events', 'pyarrow') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# -- 8. push uploads only what something reads ---------------------------------------------------


def test_push_refuses_popularity_lists_nothing_reads(tmp_path: Path) -> None:
    assert "popularity" not in PUSHABLE_KINDS
    cfg = RetrievalConfig.load(
        {
            "sources": [
                {"name": "covisit", "kind": "covisitation"},
                {"name": "popular", "kind": "popularity"},
            ]
        }
    )
    with pytest.raises(ValueError, match=r"popular: only neighbour lists are pushed"):
        push(cfg, tmp_path, "redis://127.0.0.1:1/0", only=["popular"])
    only_pop = RetrievalConfig.load({"sources": [{"name": "popular", "kind": "popularity"}]})
    with pytest.raises(ValueError, match="nothing to push"):
        push(only_pop, tmp_path, "redis://127.0.0.1:1/0")
