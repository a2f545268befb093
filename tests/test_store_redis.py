"""RedisStore: the shared store behaviour, plus failure injection on throwaway servers.

The suite runs against ``REDIS_URL`` (default ``redis://127.0.0.1:6379/15``) under a unique
``test-<uuid>`` prefix whose keys are deleted afterwards, or against a throwaway ``redis-server``
when nothing answers there. Failure tests always use their own throwaway servers on free ports.
Without Redis the tests skip locally and fail when ``CI=true``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from retrieval.errors import StoreError
from retrieval.store import Event
from retrieval.store.redis_store import ERA_HALF_LIVES, RedisStore, StoreUnavailable, redact
from tests.store_suite import StoreSuite

SLACK_S = 0.08  # scheduling noise on a shared machine on top of a read's own budget


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Redis is required in CI: {reason}")
    pytest.skip(f"NO REDIS, RedisStore NOT TESTED: {reason}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A throwaway redis-server (no persistence) that the test starts and kills."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Server:
        binary = shutil.which("redis-server")
        if binary is None:
            _unavailable("no redis-server binary for throwaway servers")
        assert binary is not None
        args = [binary, "--port", str(self.port), "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no", "--bind", "127.0.0.1", "--enable-debug-command", "yes"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=0.2, socket_connect_timeout=0.2)
        for _ in range(200):
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.RedisError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        client.ping()
        client.close()
        yield url
        return
    except redis.RedisError as exc:
        why = f"{redact(url)} does not answer ({type(exc).__name__})"
    if shutil.which("redis-server") is None:
        _unavailable(f"{why} and there is no redis-server to start")
    s = Server().start()
    yield s.url
    s.stop()


def delete_prefix(url: str, prefix: str) -> None:
    """Delete only this test's keys: the shared server is never flushed."""
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


class TestRedisStore(StoreSuite):
    supports_history_ttl = True

    @pytest.fixture(autouse=True)
    def _server(self, redis_url: str) -> Iterator[None]:
        self.url = redis_url
        self.prefixes: list[str] = []
        yield
        for p in self.prefixes:
            delete_prefix(redis_url, p)

    def make_store(self, **params: Any) -> RedisStore:
        prefix = f"test-{uuid.uuid4().hex}"
        self.prefixes.append(prefix)
        return RedisStore(self.url, prefix=prefix, **params)

    # -- Redis-only behaviour -------------------------------------------------------------

    def test_fetch_reads_history_and_segments_in_one_round_trip(self, store: RedisStore) -> None:
        now = time.time()
        store.record([Event("u", "a", now, context={"c": "x"}), Event("u", 2, now + 1)])
        r = store.fetch("u", [None, "c=x", "c=none"], popular_limit=5, timeout_ms=50)
        assert r.ok
        assert r.items == ["a", 2]
        assert r.popular[None][0] == [2, "a"] or r.popular[None][0] == ["a", 2]
        assert r.popular["c=x"][0] == ["a"]
        assert r.popular["c=none"] == ([], [])

    def test_result_cache(self, store: RedisStore) -> None:
        assert store.cache_get("k") is None
        assert store.cache_set("k", b"\x00blob", ttl_s=0.2)
        assert store.cache_get("k") == b"\x00blob"
        time.sleep(0.35)
        assert store.cache_get("k") is None
        assert store.status() == "ok"

    def test_garbage_at_keys_is_a_degraded_read(self, store: RedisStore) -> None:
        raw = redis.Redis.from_url(self.url)
        p = store.prefix
        raw.set(f"{p}:h:str-user", "not a list")
        assert store.history("str-user") == ([], [], [])
        assert store.status() == "degraded" and "history" in (store.reason or "")
        assert store.history("nobody") == ([], [], [])
        assert store.status() == "ok"

        now = time.time()
        store.record([Event("mixed", "good-1", now), Event("mixed", 2, now + 1)])
        raw.lpush(
            f"{p}:h:mixed",
            b"\xff\xfe",
            b"[1,2]",
            b"not json",
            b'[1,"x","click"]',
            b'[true,1.0,"click"]',
            b'[1,2.0,"click"] trailing',
            b'[1,2.0,"click"],[3',
            b'[[1],1.0,"click"]',
        )
        items, stamps, _ = store.history("mixed")
        assert items == ["good-1", 2]
        assert stamps == [now, now + 1]
        assert store.status() == "degraded"

        era = store._era(time.time())[0]
        raw.set(store._pop_key(era, "bad=string"), "x")
        assert store.popular("bad=string", 10) == ([], [])
        assert store.status() == "degraded"
        raw.zadd(store._pop_key(era, "bad=members"), {"7": 3.0, "abc": 2.0, "1.5": 1.0, "[": 9})
        assert store.popular("bad=members", 10)[0] == [7]
        assert store.status() == "degraded"

        raw.rpush(f"{p}:cache:listed", "x")
        assert store.cache_get("listed") is None
        assert store.status() == "degraded"
        assert store.popular(None, 10)[0]  # good data again: recovers
        assert store.status() == "ok"
        raw.close()

    def test_write_into_a_foreign_key_raises(self, store: RedisStore) -> None:
        raw = redis.Redis.from_url(self.url)
        raw.set(f"{store.prefix}:h:taken", "x")
        with pytest.raises(StoreError, match="foreign data") as info:
            store.record([Event("taken", "a", time.time())])
        assert "WRONGTYPE" in str(info.value) and store.rejected == 1
        assert store.status() == "degraded"
        assert store.popular(None, 5)[0] == ["a"]  # the batch's other commands did apply
        raw.close()

    def test_new_era_folds_the_previous_one_in(
        self, store: RedisStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import retrieval.store.base as events_mod
        import retrieval.store.redis_store as mod

        real = time.time()
        offset = [0.0]

        class Clock:
            monotonic = staticmethod(time.monotonic)
            sleep = staticmethod(time.sleep)

            @staticmethod
            def time() -> float:
                return real + offset[0]

        monkeypatch.setattr(mod, "time", Clock)
        monkeypatch.setattr(events_mod, "time", Clock)  # events are checked against this "now"
        store.record([Event("u", "a", real, "order")])
        era_s = store.half_life_s * ERA_HALF_LIVES
        offset[0] = era_s  # one era later: the old set holds the weights
        ids, scores = store.popular(None, 10)
        assert ids == ["a"]
        assert scores[0] == pytest.approx(6.0 * 2.0**-ERA_HALF_LIVES, rel=1e-6)
        store.record([Event("u", "b", real + era_s)])
        ids, scores = store.popular(None, 10)
        assert ids == ["b", "a"]
        assert scores == pytest.approx([1.0, 6.0 * 2.0**-ERA_HALF_LIVES], rel=1e-6)
        raw = redis.Redis.from_url(self.url)
        old = store._pop_key(store._era(real)[0], "_global")
        assert 0 < raw.ttl(old) <= era_s
        raw.close()

    def test_non_finite_timestamp_is_refused(self, store: RedisStore) -> None:
        with pytest.raises(ValueError, match="finite"):
            store.record([Event("u", "a", float("nan"))])


# -- failure injection (throwaway servers) ---------------------------------------------------


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t = time.monotonic()
    out = fn(*args, **kwargs)
    return out, time.monotonic() - t


def test_closed_port_reads_degrade_fast_and_writes_raise(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    secret = "s3cr3t-p%40ss"
    url = f"redis://user:{secret}@127.0.0.1:{port}/0"
    caplog.set_level(logging.DEBUG)
    with RedisStore(url, socket_timeout_ms=50) as store:
        r, took = _timed(store.fetch, "u", [None], timeout_ms=20)
        assert not r.ok and r.items == [] and r.popular == {}
        assert took < 0.02 + SLACK_S
        assert store.status() == "degraded"
        assert "onnect" in (store.reason or "")
        assert store.history("u", timeout_ms=20) == ([], [], [])
        assert store.popular(None, 10, timeout_ms=20) == ([], [])
        assert store.cache_get("k", timeout_ms=20) is None
        assert store.cache_set("k", b"v", 1.0) is False
        with pytest.raises(StoreUnavailable) as info:
            store.record([Event("u", "a", time.time())])
        texts = [str(info.value), store.reason or "", repr(store), caplog.text]
        for text in texts:
            assert secret not in text and "p@ss" not in text
        assert "***" in str(info.value)


def test_buffered_events_flush_when_redis_returns() -> None:
    srv = Server()
    with RedisStore(srv.url, buffer_events=10, socket_timeout_ms=50) as store:
        now = time.time()
        store.record([Event("u", "a", now)])  # no server yet: buffered, not raised
        store.record([Event("u", "b", now + 1), Event("u", "c", now + 2)])
        assert store.buffered == 3 and store.dropped == 0
        assert store.status() == "degraded"
        srv.start()
        try:
            store.record([Event("u", "d", now + 3)])  # the next call sends the backlog first
            assert store.buffered == 0
            assert store.history("u")[0] == ["a", "b", "c", "d"]
            assert store.status() == "ok"
        finally:
            srv.stop()


def test_buffer_overflow_drops_the_oldest_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    srv = Server()
    caplog.set_level(logging.WARNING, logger="retrieval.store.redis_store")
    with RedisStore(srv.url, buffer_events=5, socket_timeout_ms=50) as store:
        now = time.time()
        for i in range(8):
            store.record([Event("u", i, now + i)])
        assert store.buffered == 5 and store.dropped == 3
        assert "dropped the 1 oldest (3 dropped in total)" in caplog.text
        srv.start()
        try:
            assert store.flush() == 0
            assert store.history("u")[0] == [3, 4, 5, 6, 7]
        finally:
            srv.stop()


def test_status_recovers_after_a_restart_on_the_same_port(server: Server) -> None:
    store = RedisStore(server.url, socket_timeout_ms=50)
    try:
        store.record([Event("u", "a", time.time())])
        assert store.history("u")[0] == ["a"]
        server.stop()
        r, took = _timed(store.fetch, "u", [None], timeout_ms=30)
        assert not r.ok and took < 0.03 + SLACK_S
        assert store.status() == "degraded"
        with pytest.raises(StoreUnavailable):
            store.record([Event("u", "b", time.time())])
        server.start()
        # The pooled connections are dead; the next call reconnects by itself.
        assert store.history("u") == ([], [], [])  # no persistence: the data went with it
        assert store.status() == "ok"
        store.record([Event("u", "c", time.time())])
        assert store.history("u")[0] == ["c"]
    finally:
        store.close()


def test_slow_server_read_returns_empty_within_its_budget(server: Server) -> None:
    # db 1: a new connection's handshake needs a SELECT round trip, which must obey the budget.
    store = RedisStore(f"redis://127.0.0.1:{server.port}/1", socket_timeout_ms=200)
    try:
        store.record([Event("u", "a", time.time())])
        assert store.fetch("u", [None]).ok  # a warm pooled connection
        blocker = redis.Redis(port=server.port, socket_timeout=5)
        sleeping = threading.Thread(target=blocker.execute_command, args=("DEBUG", "SLEEP", 0.5))
        sleeping.start()
        time.sleep(0.05)  # the server is now busy for ~0.45 s
        r, took = _timed(store.fetch, "u", [None], timeout_ms=20)
        assert not r.ok and r.items == []
        assert took < 0.1, took
        assert store.status() == "degraded"
        # The timed-out connection was dropped: a new one must also respect the budget.
        r, took = _timed(store.fetch, "u", [None], timeout_ms=20)
        assert not r.ok and took < 0.1, took
        assert store.cache_get("k", timeout_ms=20) is None
        sleeping.join()
        blocker.close()
        r = store.fetch("u", [None], timeout_ms=200)
        assert r.ok and r.items == ["a"]
        assert store.status() == "ok"
    finally:
        store.close()


def test_write_timeout_is_not_resent() -> None:
    """A batch whose replies were lost may have run: it is reported, never applied twice."""
    srv = Server().start()
    store = RedisStore(srv.url, socket_timeout_ms=50)
    try:
        store.record([Event("u", "a", time.time())])
        blocker = redis.Redis(port=srv.port, socket_timeout=5)
        sleeping = threading.Thread(target=blocker.execute_command, args=("DEBUG", "SLEEP", 0.3))
        sleeping.start()
        time.sleep(0.05)
        with pytest.raises(StoreUnavailable, match="may or may not"):
            store.record([Event("u", "b", time.time())])
        sleeping.join()
        blocker.close()
        assert store.uncertain == 1
        time.sleep(0.05)
        ids, scores = store.popular(None, 10)
        assert dict(zip(ids, scores, strict=True))["b"] == pytest.approx(1.0, rel=1e-3)
    finally:
        store.close()
        srv.stop()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:pa55@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://:pa55@host:6380", "rediss://:***@host:6380"),
        ("redis://pa55@host", "redis://***@host"),
        ("redis://host:6379/2", "redis://host:6379/2"),
        ("unix:///tmp/r.sock?db=1&password=pa55", "unix:///tmp/r.sock?db=1&password=***"),
        ("redis://u:p%40a55@h/0?password=pa55&x=1", "redis://u:***@h/0?password=***&x=1"),
    ],
)
def test_redact_hides_passwords(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert "pa55" not in redact(url) and "a55" not in redact(url)


def test_a_bad_url_error_hides_the_password() -> None:
    with pytest.raises(ValueError) as info:
        RedisStore("redis://u:pa55@host:notaport/0")
    assert "pa55" not in str(info.value)
