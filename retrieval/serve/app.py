"""The HTTP API over one process's ``RetrieverHolder`` (FastAPI on uvicorn, bodies by orjson).

FastAPI because the request bodies are pydantic models already (the config is too): validation,
the 4xx naming each bad field and the OpenAPI document come from one definition. uvicorn with
uvloop and httptools is the common production ASGI server; orjson writes the result's numpy
columns straight to JSON, without a Python object per candidate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Header
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from retrieval.config import field_path
from retrieval.errors import (
    ClosedError,
    InputError,
    RequestTooLarge,
    RetrievalError,
    StoreError,
    exit_code,
)
from retrieval.metrics import render
from retrieval.serve.holder import NotReady, RetrieverHolder
from retrieval.serve.schema import BlendBody, BlendResponse, EventsBody
from retrieval.serve.tracing import BlendTracer
from retrieval.store import Event
from retrieval.types import CandidateSet
from retrieval.version import __version__

__all__ = ["MAX_BODY_BYTES", "create_app", "encode_result"]

logger = logging.getLogger("retrieval.serve")
access = logging.getLogger("retrieval.serve.access")

MAX_BODY_BYTES = 8 * 1024 * 1024  # a 100k-id exclude list is ~1 MB of JSON
SUPERVISOR_ENV = "RETRIEVAL_SUPERVISOR_PID"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _error(status: int, message: str, **extra: Any) -> Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    return _json({"error": message, **extra}, status, headers)


def encode_result(result: CandidateSet, fields: str = "full") -> dict[str, Any]:
    """The response body: the result's columns as they are (numpy, written by orjson)."""
    ids = result.item_ids
    out: dict[str, Any] = {
        "count": len(result),
        "arm": result.arm,
        "elapsed_ms": round(result.elapsed_ms, 3),
        "store": result.store_status,
        "cache_hit": result.cache_hit,
        "backfilled": result.backfilled,
        "filtered": result.filtered,
        "item_ids": ids if ids.dtype.kind in "iu" else ids.tolist(),
        "reports": [r.to_dict() for r in result.reports],
    }
    if fields == "full":
        out["scores"] = result.scores
        ranks = np.ascontiguousarray(result.ranks.T)
        out["ranks"] = {name: ranks[j] for j, name in enumerate(result.source_names)}
    return out


class _Edge:
    """Pure ASGI middleware: a request id on every request and response, a body size cap, one
    JSON access-log line per request, and a JSON 500 for anything unexpected."""

    def __init__(self, app: Any, *, log_requests: bool) -> None:
        self.app = app
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        rid = ""
        length = 0
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                rid = value.decode("latin-1")[:128]
            elif key == b"content-length":
                length = int(value) if value.isdigit() else 0
        rid = rid or os.urandom(8).hex()
        scope.setdefault("state", {})["request_id"] = rid
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            if length > MAX_BODY_BYTES:
                resp = _error(413, f"body of {length} bytes; at most {MAX_BODY_BYTES} allowed")
                await resp(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error", extra={"request_id": rid})
            with contextlib.suppress(Exception):
                await _error(500, "internal error", request_id=rid)(scope, receive, send_with_id)
        finally:
            if self.log_requests:
                access.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={
                        "request_id": rid,
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "ms": round((time.monotonic() - started) * 1000, 3),
                    },
                )


def create_app(
    holder: RetrieverHolder,
    *,
    workers: int = 1,
    admin_token: str | None = None,
    tracer: BlendTracer | None = None,
    log_requests: bool = True,
    load: bool = True,
    max_pending: int = 100,
) -> Any:
    """The ASGI app. ``load``: load the build in the background at startup (``/readyz`` says
    when it is done); the holder is closed at shutdown, after the requests in flight.
    ``max_pending``: blends waiting for the worker's blend thread beyond which a request is
    refused at once (503), so an overloaded worker sheds instead of queueing without end."""
    split_history = workers > 1 and holder.config.store.kind == "memory"
    blend_thread = concurrent.futures.ThreadPoolExecutor(1, "blend")
    pending = 0

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, holder.reload_in_background)
        task = loop.run_in_executor(None, _load, holder) if load else None
        yield
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        await loop.run_in_executor(None, holder.close)
        blend_thread.shutdown(wait=False)

    app = FastAPI(
        title="candidate-retrieval",
        version=__version__,
        summary="Up to k candidates for one user from parallel sources, within a deadline.",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def bad_body(http: HttpRequest, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            where = errors[0]["loc"][-1] if errors[0]["loc"] else "?"
            return _error(400, f"the body is not valid JSON (at character {where})")
        kind = http.headers.get("content-type", "")
        if "json" not in kind:
            return _error(
                415, f"send a JSON body with Content-Type: application/json, not {kind!r}"
            )
        problems = _field_problems(errors)
        return _error(422, "invalid request: " + problems[0]["field"], fields=problems)

    @app.exception_handler(RequestTooLarge)
    async def too_large(_: HttpRequest, exc: RequestTooLarge) -> Response:
        return _error(413, str(exc))

    @app.exception_handler(InputError)
    async def bad_input(_: HttpRequest, exc: InputError) -> Response:
        return _error(400, str(exc))

    @app.exception_handler(NotReady)
    @app.exception_handler(ClosedError)
    async def not_ready(_: HttpRequest, exc: Exception) -> Response:
        return _error(503, str(exc))

    @app.exception_handler(StoreError)
    async def store_down(_: HttpRequest, exc: StoreError) -> Response:
        return _error(503, f"the store cannot keep events right now: {exc}")

    @app.post("/v1/blend", response_model=BlendResponse, tags=["serving"])
    async def blend(body: BlendBody, http: HttpRequest) -> Response:
        """Up to k deduplicated candidates with provenance and the per-source report."""
        nonlocal pending
        if pending >= max_pending:
            return _error(503, f"overloaded: {pending} blends already wait in this worker")
        started_ns = time.time_ns()
        # On the worker's one blend thread: the loop stays free to accept, parse and answer
        # health checks while a blend runs, and the sources still run in parallel on their
        # lanes. ``ablend`` hands off between the loop and a pool at every step; at 1M items
        # that cost 40% of the throughput (558 against 935 requests/s, README "Serve it").
        with holder.use() as retriever:
            call = functools.partial(
                retriever.blend,
                user_id=body.user_id,
                history=body.history,
                seed_items=body.seed_items,
                context=body.context,
                exclude=body.exclude,
                k=body.k,
                deadline_ms=body.deadline_ms,
                vector=body.vector,
            )
            pending += 1
            try:
                result = await asyncio.get_running_loop().run_in_executor(blend_thread, call)
            finally:
                pending -= 1
        if tracer is not None:
            tracer.record(result, started_ns, http.state.request_id)
        return _json(encode_result(result, body.fields))

    @app.post("/v1/events", tags=["serving"])
    async def events(body: EventsBody) -> Response:
        """Record live events, the batch whole or not at all."""
        if split_history:
            return _error(
                409,
                f"store.kind is memory and the server runs {workers} workers: each worker would "
                "keep its own part of every user's history. Set store.kind: redis (shared by the "
                "workers) or serve with --workers 1.",
            )
        now = time.time()
        batch = []
        for i, e in enumerate(body.events):
            try:
                ts = now if e.timestamp is None else float(e.timestamp)
                batch.append(Event(e.user_id, e.item_id, ts, e.event_type, e.context))
            except InputError as exc:
                raise InputError(f"events[{i}]: {exc}") from None
        with holder.use() as retriever:
            await asyncio.get_running_loop().run_in_executor(None, retriever.record_many, batch)
        return _json({"recorded": len(batch)})

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> Response:
        """The process is up (it may still be loading)."""
        return _json({"status": "ok"})

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> Response:
        """Ready once the build is loaded and warmed up; 503 before, and while stopping."""
        if holder.ready:
            return _json({"status": "ready"})
        return _error(503, holder.last_error or "loading", ready=False)

    @app.get("/v1/info", tags=["operations"])
    async def info() -> Response:
        """What this worker serves: its build, generation, sources and arms."""
        gen = holder.current
        config = holder.config
        return _json(
            {
                "version": __version__,
                "pid": os.getpid(),
                "ready": holder.ready,
                "build": None if gen is None else str(gen.retriever.build),
                "generation": None if gen is None else gen.number,
                "reloads": holder.reloads,
                "last_error": holder.last_error,
                "sources": [s.name for s in config.sources],
                "arms": [{"name": a.name, "share": a.share} for a in config.experiment.arms],
                "store": config.store.kind,
                "workers": workers,
            }
        )

    @app.get("/metrics", tags=["operations"])
    async def metrics() -> Response:
        """Prometheus text exposition, summed over the workers."""
        body, content_type = render()
        return Response(body, media_type=content_type)

    @app.post("/admin/reload", status_code=202, tags=["operations"])
    async def reload(
        http: HttpRequest, authorization: str | None = Header(default=None)
    ) -> Response:
        """Load the config and its build again in every worker, then swap (202: started)."""
        if admin_token is not None:
            if authorization != f"Bearer {admin_token}":
                return _error(401, "admin endpoints need Authorization: Bearer <token>")
        elif not _loopback(http):
            return _error(
                403, "admin endpoints answer loopback clients only (or set RETRIEVAL_ADMIN_TOKEN)"
            )
        supervisor = os.environ.get(SUPERVISOR_ENV)
        if supervisor:
            os.kill(int(supervisor), signal.SIGHUP)  # the supervisor tells every worker
        else:
            holder.reload_in_background()
        return _json({"reload": "started"}, 202)

    return _Edge(app, log_requests=log_requests)


# pydantic names the member of a union that failed (``history.0.int``, ``history.0.str``): one
# problem per field reads better, with the members' messages joined.
_UNION_TAGS = {"int", "str", "float", "bool", "none"}


def _field_problems(errors: Sequence[Any]) -> list[dict[str, str]]:
    by_field: dict[str, list[str]] = {}
    for err in errors:
        loc = [p for p in err["loc"] if p != "body"]
        if loc and loc[-1] in _UNION_TAGS and err["type"] != "missing":
            loc = loc[:-1]
        msgs = by_field.setdefault(field_path(loc) or "(body)", [])
        if err["msg"] not in msgs:
            msgs.append(err["msg"])
    return [{"field": f, "message": "; or ".join(m)} for f, m in by_field.items()]


def _load(holder: RetrieverHolder) -> None:
    """The first load. When it fails under the supervisor, the whole server stops (exit code
    3 for artifacts, 2 for the config): a server that can never become ready should not look
    alive. Alone (an app made by ``create_app``), it stays up and not ready."""
    try:
        holder.load()
    except Exception as exc:
        holder.last_error = f"{type(exc).__name__}: {exc}"
        logger.error("the build did not load: %s", holder.last_error)
        supervisor = os.environ.get(SUPERVISOR_ENV)
        if supervisor:
            code = exit_code(exc) if isinstance(exc, RetrievalError) else 1
            signal_for = {2: signal.SIGUSR2, 3: signal.SIGUSR1}
            os.kill(int(supervisor), signal_for.get(code, signal.SIGTERM))


def _loopback(http: HttpRequest) -> bool:
    host = http.client.host if http.client else ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
