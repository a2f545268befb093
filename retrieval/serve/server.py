"""``retrieval serve``: a supervisor process and N worker processes on one listening socket.

Processes, not threads, because one process is GIL-bound (two threads blend slower than two
processes, benchmarks/README.md). The supervisor binds the socket, starts the workers (spawned,
so each loads its own retriever; the artifacts are memory-mapped, so the page cache is shared),
restarts a worker that dies, forwards SIGHUP (reload) to every worker, and on SIGTERM or SIGINT
stops them gracefully: each finishes its requests in flight, then closes its sources.

Metrics: the workers write prometheus_client's multiprocess files into one folder, and any
worker's ``/metrics`` sums them.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.config import load_config
from retrieval.serve.app import SUPERVISOR_ENV, create_app
from retrieval.serve.logs import configure_logging

__all__ = ["ServeSettings", "serve"]

logger = logging.getLogger("retrieval.serve")

ADMIN_TOKEN_ENV = "RETRIEVAL_ADMIN_TOKEN"
_RESTART_PAUSE_S = 1.0  # a worker that dies at once is not restarted in a tight loop


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    graceful_s: float = 30.0
    watch_s: float = 2.0
    max_pending: int = 100
    otel: bool = False
    access_log: bool = True
    json_logs: bool = True
    log_level: str = "info"


def serve(config_path: str | Path, settings: ServeSettings) -> int:
    """Serve until SIGTERM or SIGINT; the exit code is 0 after a clean stop."""
    configure_logging(settings.log_level, settings.json_logs)
    config = load_config(config_path)  # a bad config fails here, named, before any worker
    if settings.workers > 1 and config.store.kind == "memory":
        logger.warning(
            "store.kind is memory with %d workers: each worker has its own store, so "
            "POST /v1/events is refused (409) to keep history from splitting; use store.kind: "
            "redis to record events",
            settings.workers,
        )
    metrics_dir = tempfile.mkdtemp(prefix="retrieval-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ[SUPERVISOR_ENV] = str(os.getpid())
    sock = _bind(settings.host, settings.port)
    port = sock.getsockname()[1]
    logger.info(
        "serving %s on http://%s:%d with %d workers",
        config_path,
        settings.host,
        port,
        settings.workers,
        extra={"port": port, "workers": settings.workers},
    )
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    failed = 0  # the exit code when a worker could not load the build
    reloads = 0

    def start() -> Any:
        proc = ctx.Process(
            target=_worker_main,
            args=(str(config_path), sock, settings),
            name="retrieval-worker",
            daemon=False,
        )
        proc.start()
        return proc

    def on_stop(signum: int, _: Any) -> None:
        nonlocal stopping
        stopping = True

    def on_load_failed(signum: int, _: Any) -> None:
        nonlocal stopping, failed
        failed = 3 if signum == signal.SIGUSR1 else 2
        stopping = True

    def on_hup(signum: int, _: Any) -> None:
        nonlocal reloads
        reloads += 1

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    signal.signal(signal.SIGUSR1, on_load_failed)  # a worker's build failed its checks
    signal.signal(signal.SIGUSR2, on_load_failed)  # a worker's config did not load
    workers = [start() for _ in range(settings.workers)]
    forwarded = 0
    try:
        while not stopping:
            time.sleep(0.1)
            if reloads != forwarded:
                forwarded = reloads
                logger.info("reload: telling %d workers", len(workers))
                for w in workers:
                    if w.is_alive() and w.pid is not None:
                        os.kill(w.pid, signal.SIGHUP)
            for i, w in enumerate(workers):
                if not w.is_alive() and not stopping:
                    logger.error("worker %s exited with %s; restarting it", w.pid, w.exitcode)
                    _mark_dead(w.pid)
                    time.sleep(_RESTART_PAUSE_S)
                    workers[i] = start()
    finally:
        logger.info("stopping: %d workers finish their requests in flight", len(workers))
        for w in workers:
            if w.is_alive() and w.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.graceful_s + 15.0
        for w in workers:
            w.join(timeout=max(0.1, deadline - time.monotonic()))
            if w.is_alive():
                logger.error("worker %s did not stop in time: killed", w.pid)
                w.kill()
                w.join(5)
        sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if failed:
        logger.error("stopped: a worker could not load the build (its error is above)")
        return failed
    logger.info("stopped")
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _mark_dead(pid: int | None) -> None:
    if pid is None:
        return
    with contextlib.suppress(Exception):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def _worker_main(config_path: str, sock: socket.socket, settings: ServeSettings) -> None:
    """One worker: load the build in the background, serve HTTP on the shared socket."""
    import uvicorn

    from retrieval.metrics import PrometheusMetrics
    from retrieval.serve.holder import RetrieverHolder
    from retrieval.serve.tracing import BlendTracer

    configure_logging(settings.log_level, settings.json_logs)
    # Ctrl-C reaches the supervisor alone, which stops the workers once: a second signal would
    # make uvicorn drop the requests in flight.
    os.setpgrp()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the app's own handler is in place
    _exit_with_parent(int(os.environ[SUPERVISOR_ENV]))
    holder = RetrieverHolder(config_path, metrics=PrometheusMetrics(), watch_s=settings.watch_s)
    app = create_app(
        holder,
        workers=settings.workers,
        admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None,
        tracer=BlendTracer() if settings.otel else None,
        log_requests=settings.access_log,
        max_pending=settings.max_pending,
    )
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        loop=_best("uvloop", "asyncio"),
        http=_best("httptools", "h11"),
        timeout_graceful_shutdown=int(settings.graceful_s),
        timeout_keep_alive=15,
    )
    uvicorn.Server(config).run(sockets=[sock])


def _exit_with_parent(parent: int) -> None:
    """Stop gracefully when the supervisor is gone (killed with SIGKILL, say): a worker in
    its own process group would otherwise keep serving with nobody to stop it."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _best(fast: str, fallback: str) -> str:
    try:
        __import__(fast)
    except ImportError:
        return fallback
    return fast
