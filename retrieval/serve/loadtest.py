"""``retrieval loadtest``: drive a running server over HTTP and print what it did.

Keep-alive HTTP/1.1 connections written by hand on asyncio streams (uvloop when installed), so
the generator spends little of the machine it shares with the server. Two modes:

- fixed concurrency (closed loop): each of C connections sends its next request when the
  last one answered;
- fixed rate (open loop, ``--rate``): requests are due on a fixed schedule and each latency
  counts from when the request was due, so a server that falls behind shows it in the
  percentiles instead of hiding it (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

__all__ = ["LoadResult", "bodies_from_requests", "run_load"]


@dataclass
class LoadResult:
    url: str
    mode: str
    concurrency: int
    rate: float | None
    duration_s: float
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)

        def pct(q: float) -> float | None:
            return round(float(np.percentile(lat, q)), 3) if lat.size else None

        return {
            "url": self.url,
            "mode": self.mode,
            "concurrency": self.concurrency,
            "rate": self.rate,
            "duration_s": round(self.duration_s, 3),
            "sent": self.sent,
            "ok": self.ok,
            "failed": self.sent - self.ok,
            "errors": dict(self.errors),
            "throughput_rps": round(self.ok / self.duration_s, 1) if self.duration_s else 0.0,
            "p50_ms": pct(50),
            "p95_ms": pct(95),
            "p99_ms": pct(99),
            "max_ms": round(float(lat.max()), 3) if lat.size else None,
        }

    def format(self) -> str:
        d = self.to_dict()
        rate = f" at {d['rate']:g}/s" if d["rate"] else ""
        lines = [
            f"{d['url']}: {d['mode']}{rate}, {d['concurrency']} connections, "
            f"{d['duration_s']:.1f} s",
            f"  requests {d['sent']}  ok {d['ok']}  failed {d['failed']}  "
            f"throughput {d['throughput_rps']:.1f}/s",
            f"  latency p50 {d['p50_ms']} ms  p95 {d['p95_ms']} ms  p99 {d['p99_ms']} ms  "
            f"max {d['max_ms']} ms",
        ]
        if d["errors"]:
            lines.append("  errors " + ", ".join(f"{k}: {v}" for k, v in d["errors"].items()))
        return "\n".join(lines)


def bodies_from_requests(requests: Sequence[Any], fields: str = "ids") -> list[bytes]:
    """JSON bodies for ``/v1/blend`` from ``retrieval.types.Request`` objects."""
    out = []
    for r in requests:
        body: dict[str, Any] = {"fields": fields}
        if r.user_id is not None:
            body["user_id"] = r.user_id
        if r.history:
            body["history"] = list(r.history)
        if r.context:
            body["context"] = dict(r.context)
        out.append(orjson.dumps(body))
    return out


class _Conn:
    """One keep-alive connection; reconnects after an error."""

    def __init__(self, host: str, port: int, path: str, timeout_s: float) -> None:
        self.host, self.port, self.path, self.timeout_s = host, port, path, timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()

    async def post(self, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), self.timeout_s)
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        if length:
            await asyncio.wait_for(self.reader.readexactly(length), self.timeout_s)
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None


async def _load(
    url: str,
    bodies: Sequence[bytes],
    concurrency: int,
    duration_s: float,
    rate: float | None,
    timeout_s: float,
) -> LoadResult:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/v1/blend"
    mode = "fixed rate" if rate else "fixed concurrency"
    result = LoadResult(url, mode, concurrency, rate, duration_s)
    errors: Counter[str] = Counter()
    conns = [_Conn(host, port, path, timeout_s) for _ in range(concurrency)]
    free: asyncio.Queue[_Conn] = asyncio.Queue()
    for c in conns:
        free.put_nowait(c)
    start = time.perf_counter()
    end = start + duration_s
    counter = 0

    async def one(conn: _Conn, body: bytes, due: float) -> None:
        result.sent += 1
        try:
            status = await conn.post(body)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            errors[type(exc).__name__] += 1
            await conn.close()
            return
        if 200 <= status < 300:
            result.ok += 1
            result.latencies_ms.append((time.perf_counter() - due) * 1000.0)
        else:
            errors[f"HTTP {status}"] += 1

    async def closed_loop(conn: _Conn, i: int) -> None:
        n = i
        while time.perf_counter() < end:
            await one(conn, bodies[n % len(bodies)], time.perf_counter())
            n += concurrency

    if rate is None:
        await asyncio.gather(*(closed_loop(c, i) for i, c in enumerate(conns)))
    else:
        pending: set[asyncio.Task[None]] = set()
        interval = 1.0 / rate

        async def scheduled(body: bytes, due: float) -> None:
            conn = await free.get()
            try:
                await one(conn, body, due)
            finally:
                free.put_nowait(conn)

        while True:
            due = start + counter * interval
            if due >= end:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(scheduled(bodies[counter % len(bodies)], due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            counter += 1
        if pending:
            await asyncio.gather(*pending)
    result.duration_s = time.perf_counter() - start
    result.errors = dict(errors)
    for c in conns:
        await c.close()
    return result


def run_load(
    url: str,
    bodies: Sequence[bytes],
    *,
    concurrency: int = 8,
    duration_s: float = 10.0,
    rate: float | None = None,
    timeout_s: float = 10.0,
) -> LoadResult:
    """Drive ``url`` with ``bodies`` (cycled) for ``duration_s``; see the module docstring."""
    if not bodies:
        raise ValueError("no request bodies to send")
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    return runner(_load(url, bodies, concurrency, duration_s, rate, timeout_s))
