"""`retrieval serve` as a user runs it: the real server in its own process on a free port,
spoken to over HTTP. Blend, events, bad bodies, readiness, metrics, reload under load, arms,
graceful stop and a worker that dies."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
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

from retrieval import Retriever
from retrieval.config import load_config
from retrieval.offline.build import build
from retrieval.serve.loadtest import run_load
from retrieval.tools.synth import synthesize
from tests.test_store_redis import delete_prefix, redis_url  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent

SOURCES = """
sources:
  - name: covisit
    kind: covisitation
    params: {window: 5, top_k: 30}
  - name: itemcf
    kind: itemcf
    params: {neighbours: 30}
  - name: popular
    kind: popularity
    weight: 0.2
  - name: recent
    kind: recent
    weight: 0.5
"""


def write_config(
    path: Path, artifacts: Path, extra: str = "", store: str = "{kind: memory}"
) -> Path:
    path.write_text(
        f"k: 50\ndeadline_ms: 200\nartifacts: {artifacts}\n"
        f"blend: {{fallback: popular}}\nstore: {store}\n" + textwrap.dedent(extra) + SOURCES
    )
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A build at ``out`` (a link, as `retrieval build` publishes) and the logs of two builds."""
    root = tmp_path_factory.mktemp("serve")
    logs = {}
    for name, seed in (("a", 1), ("b", 2)):
        logs[name] = root / f"{name}.parquet"
        synthesize(logs[name], n_items=600, n_users=200, n_events=5000, seed=seed)
    out = root / "build"
    cfg = write_config(root / "c.yaml", out)
    build(load_config(cfg), logs["a"], out, progress=False)
    return {"root": root, "out": out, "config": cfg, "log-a": logs["a"], "log-b": logs["b"]}


def catalogue(built: dict[str, Path], n: int = 8) -> list[int]:
    ids = np.load(built["out"] / "ids" / "items.npy")
    return [int(x) for x in ids[5 : 5 + n]]


class Served:
    """``retrieval serve CONFIG --port 0``: started, its port read from its first log line."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "retrieval.tools.cli", "serve", str(config), "--port", "0"]
        cmd += ["--watch-s", "0.3", "--graceful-s", "10", *args]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=full_env
        )
        self.lines: list[str] = []
        self.port = 0
        got_port = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if not self.port and '"port"' in line:
                    self.port = int(json.loads(line)["port"])
                    got_port.set()

        threading.Thread(target=read, daemon=True).start()
        end = time.monotonic() + 60
        while not got_port.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                time.sleep(0.2)  # the reader's last lines
                raise AssertionError("server did not start:\n" + "".join(self.lines))

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            payload = resp.read()
            try:
                parsed: Any = json.loads(payload)
            except ValueError:
                parsed = payload.decode()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed
        finally:
            conn.close()

    def blend(self, **body: Any) -> dict[str, Any]:
        status, _, out = self.request("POST", "/v1/blend", body)
        assert status == 200, out
        return out  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError("server exited:\n" + "".join(self.lines))
            try:
                if self.request("GET", "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("not ready in time:\n" + "".join(self.lines[-30:]))

    def wait_all_ready(self, workers: int, timeout: float = 90.0) -> None:
        """Every worker answers ready (new connections land on any of them)."""
        self.wait_ready(timeout)
        end = time.monotonic() + timeout
        seen: set[int] = set()
        while len(seen) < workers and time.monotonic() < end:
            status, _, info = self.request("GET", "/v1/info")
            if status == 200 and info["ready"]:
                seen.add(info["pid"])
            time.sleep(0.02)
        assert len(seen) == workers, f"ready workers: {seen}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[Served] = []

    def start(config: Path, *args: str, **kw: Any) -> Served:
        s = Served(config, *args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# -- blend ------------------------------------------------------------------------------------


def test_blend_over_http_matches_the_library(built: dict[str, Path], serve: Any) -> None:
    server = serve(built["config"], "--workers", "2")
    server.wait_all_ready(2)
    history = catalogue(built)
    got = server.blend(user_id=7, history=history, k=20)
    with Retriever(load_config(built["config"])) as r:
        want = r.blend(user_id=7, history=history, k=20)
    assert all(rep["status"] == "ok" for rep in got["reports"]), got["reports"]
    assert got["item_ids"] == want.item_ids.tolist()
    assert got["count"] == len(want) == 20
    assert np.allclose(got["scores"], want.scores)
    for j, name in enumerate(want.source_names):
        assert got["ranks"][name] == want.ranks[:, j].tolist()
    assert {rep["name"] for rep in got["reports"]} == {"covisit", "itemcf", "popular", "recent"}
    compact = server.blend(user_id=7, history=history, k=20, fields="ids")
    assert compact["item_ids"] == got["item_ids"]
    assert "scores" not in compact and "ranks" not in compact

    status, _, spec = server.request("GET", "/openapi.json")
    assert status == 200
    assert {"/v1/blend", "/v1/events", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])


def test_bad_bodies_get_a_4xx_naming_the_field(built: dict[str, Path], serve: Any) -> None:
    server = serve(
        write_config(built["root"] / "limits.yaml", built["out"], "limits: {max_exclude: 5}\n")
    )
    server.wait_ready()
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"body": {"k": "ten"}}, 422, "k"),
        ({"body": {"k": 0}}, 422, "k"),
        ({"body": {"deadline_ms": -1}}, 422, "deadline_ms"),
        ({"body": {"history": [1.5]}}, 422, "history[0]"),
        ({"body": {"exclude": [True]}}, 422, "exclude[0]"),
        ({"body": {"user": 3}}, 422, "user"),
        ({"body": {"context": {"country": 3}}}, 422, "context.country"),
        ({"body": {"fields": "all"}}, 422, "fields"),
        ({"body": [1, 2]}, 422, "(body)"),
        ({"raw": b"{not json"}, 400, "JSON"),
        ({"body": {"history": [""]}}, 400, "history[0]"),
        ({"body": {"history": [2**70]}}, 400, "history[0]"),
        ({"body": {"exclude": list(range(6))}}, 413, "exclude"),
        ({"raw": b'{"k": 5}', "headers": {"Content-Type": "text/plain"}}, 415, "Content-Type"),
        ({"raw": b"[" + b"1," * (5 * 1024 * 1024) + b"1]"}, 413, "bytes"),
    ]
    for case, status, named in cases:
        got, _, body = server.request(
            "POST", "/v1/blend", case.get("body"), case.get("headers"), case.get("raw")
        )
        assert got == status, (case if "raw" not in case else "raw body", got, body)
        text = json.dumps(body)
        assert named in text, (named, body)
    bad_events = {"events": [{"user_id": 1, "item_id": 2}, {"user_id": 1, "item_id": None}]}
    status, _, body = server.request("POST", "/v1/events", bad_events)
    assert status == 422 and "events[1].item_id" in json.dumps(body), body
    status, _, body = server.request("POST", "/v1/events", {"events": []})
    assert status == 422 and "events" in json.dumps(body)
    ms = {"events": [{"user_id": 1, "item_id": 2, "timestamp": 1.7e12}]}
    status, _, body = server.request("POST", "/v1/events", ms)
    assert status == 400 and "events[0]" in body["error"], body
    assert server.blend(k=3)["count"] == 3  # still serving
    assert not [e for e in server.logs() if e.get("level") == "error"]


def test_readiness_waits_for_the_build(built: dict[str, Path], serve: Any) -> None:
    cfg = built["root"] / "slow.yaml"
    cfg.write_text(
        "k: 20\nsources:\n  - {name: slow, kind: 'tests.toy_sources:SlowLoad', "
        "params: {load_s: 3}}\n"
    )
    server = serve(cfg)
    seen_loading = refused = False
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            ready, _, _ = server.request("GET", "/readyz")
        except OSError:
            time.sleep(0.05)
            continue
        if ready == 503:
            seen_loading = True
            assert server.request("GET", "/healthz")[0] == 200
            status, headers, body = server.request("POST", "/v1/blend", {"k": 3})
            if status == 200:  # the load finished between the two requests: ready from now on
                assert server.request("GET", "/readyz")[0] == 200
                break
            assert status == 503 and headers.get("retry-after") and "loading" in body["error"]
            refused = True
        elif ready == 200:
            break
        time.sleep(0.05)
    assert seen_loading, "readyz never said 503 while a 3 s source loaded"
    assert refused, "no blend was refused while the 3 s source loaded"
    assert server.blend(k=5)["item_ids"] == [1, 2, 3, 4, 5]


# -- events -----------------------------------------------------------------------------------


def test_events_with_redis_reach_every_worker(
    built: dict[str, Path],
    serve: Any,
    redis_url: str,  # noqa: F811
) -> None:
    prefix = f"test-serve-{uuid.uuid4().hex}"
    store = json.dumps({"kind": "redis", "url": redis_url, "prefix": prefix})
    cfg = write_config(built["root"] / "redis.yaml", built["out"], store=store)
    try:
        server = serve(cfg, "--workers", "2")
        server.wait_all_ready(2)
        items = catalogue(built, 5)
        now = time.time()
        events = [{"user_id": 42, "item_id": i, "timestamp": now + n} for n, i in enumerate(items)]
        status, _, body = server.request("POST", "/v1/events", {"events": events})
        assert status == 200 and body == {"recorded": 5}
        pids = set()
        for _ in range(20):  # a new connection each time: both workers answer some
            out = server.blend(user_id=42, k=20)
            recent = next(r for r in out["reports"] if r["name"] == "recent")
            assert recent["status"] == "ok" and recent["returned"] == 5, out["reports"]
            assert out["store"] == "ok"
            pids.add(server.request("GET", "/v1/info")[2]["pid"])
        assert len(pids) == 2
    finally:
        delete_prefix(redis_url, prefix)


def test_embedded_store_events(built: dict[str, Path], serve: Any) -> None:
    many = serve(built["config"], "--workers", "2")
    one = serve(built["config"])
    many.wait_ready()
    one.wait_ready()
    events = {"events": [{"user_id": 9, "item_id": i} for i in catalogue(built, 3)]}
    status, _, body = many.request("POST", "/v1/events", events)
    assert status == 409 and "store.kind: redis" in body["error"]
    assert any("POST /v1/events is refused" in line for line in many.lines)
    status, _, body = one.request("POST", "/v1/events", events)
    assert status == 200 and body["recorded"] == 3
    out = one.blend(user_id=9, k=20)
    assert next(r for r in out["reports"] if r["name"] == "recent")["returned"] == 3


# -- metrics, logs ----------------------------------------------------------------------------


def scrape(server: Served) -> dict[str, float]:
    status, headers, text = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_metrics_sum_over_workers(built: dict[str, Path], serve: Any) -> None:
    server = serve(built["config"], "--workers", "2")
    server.wait_all_ready(2)
    history = catalogue(built)
    for i in range(30):
        server.blend(user_id=i, history=history, k=20, exclude=history[:2])
    for _ in range(3):  # whichever worker answers, the sums are the same
        m = scrape(server)
        assert m['retrieval_blend_seconds_count{arm="default"}'] == 30
        assert m['retrieval_source_calls_total{source="covisit",status="ok"}'] == 30
        assert m['retrieval_source_seconds_count{source="itemcf"}'] == 30
        assert m['retrieval_candidates_total{kind="returned"}'] == 30 * 20
        assert m['retrieval_candidates_total{kind="filtered"}'] > 0  # the excluded history
        assert m['retrieval_store_reads_total{status="ok"}'] == 30
        assert m['retrieval_breaker_open{source="covisit"}'] == 0
    status, headers, _ = server.request("POST", "/v1/blend", {"k": 2}, {"X-Request-Id": "abc-1"})
    assert status == 200 and headers["x-request-id"] == "abc-1"
    status, headers, _ = server.request("POST", "/v1/blend", {"k": 2})
    rid = headers["x-request-id"]
    time.sleep(0.3)
    access = [e for e in server.logs() if e.get("logger") == "retrieval.serve.access"]
    mine = [e for e in access if e["request_id"] in ("abc-1", rid)]
    assert len(mine) == 2 and all(e["status"] == 200 and e["path"] == "/v1/blend" for e in mine)


# -- hot reload -------------------------------------------------------------------------------


def test_reload_under_load_fails_no_request(built: dict[str, Path], serve: Any) -> None:
    root = built["root"] / "reload"
    root.mkdir()
    out = root / "build"
    cfg = write_config(root / "c.yaml", out)
    build(load_config(cfg), built["log-a"], out, progress=False)
    server = serve(cfg, "--workers", "2")
    server.wait_all_ready(2)
    first = server.request("GET", "/v1/info")[2]["build"]
    bodies = [
        json.dumps({"user_id": u, "history": catalogue(built, 4), "k": 50}).encode()
        for u in range(50)
    ]
    results: list[Any] = []
    load = threading.Thread(
        target=lambda: results.append(
            run_load(
                f"http://127.0.0.1:{server.port}/v1/blend", bodies, concurrency=4, duration_s=8
            )
        )
    )
    load.start()
    time.sleep(1.0)
    build(load_config(cfg), built["log-b"], out, progress=False)  # a new build at the link
    time.sleep(2.5)
    assert server.request("POST", "/admin/reload")[0] == 202
    time.sleep(1.5)
    server.proc.send_signal(signal.SIGHUP)
    load.join(60)
    result = results[0].to_dict()
    assert result["sent"] > 50 and result["failed"] == 0, result
    infos = [server.request("GET", "/v1/info")[2] for _ in range(10)]
    assert all(i["build"] != first for i in infos), infos
    assert all(i["generation"] >= 2 for i in infos), infos  # the link, then the admin call
    reloaded = [e for e in server.logs() if e.get("msg", "").startswith("reloaded build")]
    assert len(reloaded) >= 4  # two workers, at least two reloads each
    assert not [e for e in server.logs() if e.get("level") == "error"]


def test_a_build_that_does_not_load_keeps_the_old_one(
    built: dict[str, Path], serve: Any, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.yaml", built["out"])
    server = serve(cfg)
    server.wait_ready()
    cfg.write_text(cfg.read_text().replace("k: 50", "k: -1"))
    assert server.request("POST", "/admin/reload")[0] == 202
    end = time.monotonic() + 30
    while time.monotonic() < end:
        info = server.request("GET", "/v1/info")[2]
        if info["last_error"]:
            break
        time.sleep(0.1)
    assert "k" in info["last_error"] and info["generation"] == 0
    assert server.blend(k=4)["count"] == 4


def test_admin_reload_needs_the_token_when_set(built: dict[str, Path], serve: Any) -> None:
    server = serve(built["config"], env={"RETRIEVAL_ADMIN_TOKEN": "s3cret"})
    server.wait_ready()
    assert server.request("POST", "/admin/reload")[0] == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert server.request("POST", "/admin/reload", headers=auth)[0] == 202


# -- arms -------------------------------------------------------------------------------------


def test_arms_by_stable_hash(built: dict[str, Path], serve: Any) -> None:
    arms = """
    experiment:
      salt: test-salt
      arms:
        - {name: control, share: 0.5}
        - {name: lean, share: 0.5, sources: [popular, recent], blend: {strategy: score}}
    """
    server = serve(write_config(built["root"] / "arms.yaml", built["out"], arms), "--workers", "2")
    server.wait_all_ready(2)
    history = catalogue(built, 4)
    seen: dict[int, str] = {}
    for user in range(120):
        out = server.blend(user_id=user, history=history, k=10, fields="ids")
        seen[user] = out["arm"]
        names = {r["name"] for r in out["reports"]}
        if out["arm"] == "lean":
            assert names == {"popular", "recent"}
        else:
            assert out["arm"] == "control" and "covisit" in names
    lean = sum(a == "lean" for a in seen.values())
    assert 30 <= lean <= 90, lean  # 50% of 120; a binomial 5-sigma band
    for user in (0, 1, 2, 3, 77):  # stable, whichever worker answers
        assert server.blend(user_id=user, k=5, fields="ids")["arm"] == seen[user]
    assert server.blend(k=5)["arm"] == "control"  # no user id: the first arm
    m = scrape(server)
    assert m['retrieval_blend_seconds_count{arm="lean"}'] == lean + sum(
        seen[u] == "lean" for u in (0, 1, 2, 3, 77)
    )
    info = server.request("GET", "/v1/info")[2]
    assert [a["name"] for a in info["arms"]] == ["control", "lean"]


def slow_config(tmp_path: Path, delay_ms: int) -> Path:
    """One source that takes ``delay_ms`` per call, well within the deadline."""
    cfg = tmp_path / "slow.yaml"
    cfg.write_text(
        "k: 10\ndeadline_ms: 5000\nsources:\n"
        "  - {name: slow, kind: 'tests.toy_sources:ListSource', timeout_ms: 4000, "
        f"params: {{items: [1, 2, 3], delay_ms: {delay_ms}}}}}\n"
    )
    return cfg


# -- lifecycle --------------------------------------------------------------------------------


def test_graceful_stop_finishes_requests_in_flight(tmp_path: Path, serve: Any) -> None:
    server = serve(slow_config(tmp_path, delay_ms=1200), "--workers", "2")
    server.wait_all_ready(2)
    answers: list[Any] = []

    def ask() -> None:
        try:
            answers.append(server.request("POST", "/v1/blend", {"k": 3}))
        except OSError as exc:
            answers.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the requests are on the slow source now
    assert server.stop(signal.SIGTERM) == 0
    for t in threads:
        t.join(10)
    assert len(answers) == 4
    for a in answers:
        assert not isinstance(a, Exception), a
        status, _, body = a
        assert status == 200 and body["item_ids"] == [1, 2, 3], body
        assert body["reports"][0]["status"] == "ok"


def test_a_dead_worker_is_replaced(built: dict[str, Path], serve: Any) -> None:
    server = serve(built["config"], "--workers", "2")
    server.wait_all_ready(2)
    victim = server.request("GET", "/v1/info")[2]["pid"]
    os.kill(victim, signal.SIGKILL)
    end = time.monotonic() + 60
    while time.monotonic() < end and not any("restarting" in line for line in server.lines):
        time.sleep(0.1)
    assert any("restarting" in line for line in server.lines)
    server.wait_all_ready(2)
    pids = {server.request("GET", "/v1/info")[2]["pid"] for _ in range(30)}
    assert victim not in pids
    assert server.blend(k=5)["count"] == 5


def test_a_bad_config_fails_before_serving(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("k: 5\nsources: []\n")
    proc = subprocess.run(
        [sys.executable, "-m", "retrieval.tools.cli", "serve", str(cfg), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "sources" in proc.stderr


def test_a_build_that_cannot_load_stops_the_server(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "no-such-build")
    proc = subprocess.run(
        [sys.executable, "-m", "retrieval.tools.cli", "serve", str(cfg), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "did not load" in proc.stderr and "no-such-build" in proc.stderr


def test_an_overloaded_worker_sheds_with_503(tmp_path: Path, serve: Any) -> None:
    server = serve(slow_config(tmp_path, delay_ms=400), "--max-pending", "2")
    server.wait_ready()
    answers: list[Any] = []
    threads = [
        threading.Thread(target=lambda: answers.append(server.request("POST", "/v1/blend", {})))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)  # two blends hold the worker for 800 ms; its loop still answers
    t0 = time.monotonic()
    assert server.request("GET", "/readyz")[0] == 200
    assert time.monotonic() - t0 < 0.3
    for t in threads:
        t.join(30)
    statuses = sorted(a[0] for a in answers)
    assert statuses.count(200) >= 2 and statuses.count(503) >= 1, statuses
    shed = next(a for a in answers if a[0] == 503)
    assert "overloaded" in shed[2]["error"] and shed[1].get("retry-after") == "1"
