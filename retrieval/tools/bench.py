"""``retrieval bench``: replay realistic requests against built artifacts and time everything.

Requests: with ``--events``, N events are drawn uniformly from the log (so busy users come up as
often as they do in traffic) and each becomes a request for that user with the events before it
as history (timestamps and types included) and its segment values as context: what the app
would send at that moment. Without a log, users are drawn from the build's id map and the
request carries the user id alone (history then comes from the store, empty in a fresh memory
store: the neighbour sources are skipped, so prefer a log).

Order matters for the figures: warm-up, timed blends (latency per call, throughput at the given
concurrency), the process RSS (before anything else allocates), and only then the exact search
reference and the ANN recall, which read the whole item matrix.
"""

from __future__ import annotations

import concurrent.futures
import gc
import multiprocessing
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from retrieval.artifacts import ArtifactError
from retrieval.config import RetrievalConfig
from retrieval.types import Deadline, Request, SourceStatus

__all__ = [
    "BenchResult",
    "exact_reference",
    "rss_mb",
    "run_bench",
    "run_bench_processes",
    "sample_requests",
]

_HISTORY = 50  # events of history per request (sources read their own 20-50 of them)
_WARM_UP = 50


def rss_mb(field_name: str = "VmRSS") -> float:
    """This process's resident set (or ``VmHWM``, its peak) from /proc/self/status, in MB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:  # not Linux
        pass
    return float("nan")


def sample_requests(
    config: RetrievalConfig, artifacts: Path, events_path: Path | None, n: int, seed: int = 0
) -> list[Request]:
    """``n`` requests: from the log's events (user, prior history, segments) or from user ids.

    The log is read in a child process: the allocator keeps what reading 100M events took,
    and that would count as the serving process's RSS.
    """
    if events_path is None:
        return _sample(config, artifacts, None, n, seed)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_sample, config, artifacts, events_path, n, seed).result()


def _sample(
    config: RetrievalConfig, artifacts: Path, events_path: Path | None, n: int, seed: int
) -> list[Request]:
    rng = np.random.default_rng(seed)
    if events_path is None:
        from retrieval.artifacts import IdMap

        users = IdMap.load(artifacts / "ids" / "users.npy", mmap=True)
        picks = rng.integers(0, len(users), size=n)
        return [Request(user_id=u.item()) for u in users.to_external(picks)]
    from retrieval.offline.build import needed_segments
    from retrieval.offline.events import read_events

    log = read_events(events_path, config.events.columns, needed_segments(config))
    picks = np.sort(rng.choice(len(log), size=min(n, len(log)), replace=False))
    first = np.searchsorted(log.users, log.users[picks], side="left")
    requests = []
    names = log.event_type_names
    for p, lo in zip(picks.tolist(), first.tolist(), strict=True):
        hist = slice(max(lo, p - _HISTORY), p)
        types = (
            tuple(names[t] for t in log.event_types[hist].tolist())
            if log.event_types is not None and names
            else None
        )
        requests.append(
            Request(
                user_id=log.user_ids.to_external(log.users[p : p + 1])[0].item(),
                history=tuple(log.item_ids.to_external(log.items[hist]).tolist()),
                history_timestamps=tuple(log.timestamps[hist].tolist()),
                history_event_types=types,
                context={
                    seg: str(log.segment_values[seg][codes[p]])
                    for seg, codes in log.segments.items()
                },
            )
        )
    del log
    gc.collect()
    order = rng.permutation(len(requests))  # not grouped by user
    return [requests[i] for i in order]


@dataclass
class SourceStats:
    """One source's outcomes over a run, counted from its reports. ``latencies`` (ms) are of
    its ``ok`` calls only, so a fast failure cannot flatter them; ``errors`` counts every
    status but ok, timeout and skipped (error, shed, circuit_open)."""

    latencies: list[float] = field(default_factory=list)
    timeouts: int = 0
    errors: int = 0
    skipped: int = 0
    first_error: str | None = None  # a count alone does not say what to fix


@dataclass
class BenchResult:
    """What a bench run measured: per-blend latencies (ms, on the caller's clock), wall time
    (s), memory (MB: RSS, peak, and the private part, without the page cache the mmapped
    artifacts share), each source's stats and the mean slate size; ``exact`` holds the exact
    search reference and ANN recall when asked for. ``major_faults``: pages read from disk
    during the timed run; each stops the thread that touched the page, and one that holds the
    GIL stops the whole process (a source "could not start" in time then)."""

    requests: int
    concurrency: int
    latencies_ms: npt.NDArray[np.float64]
    seconds: float
    rss_mb: float
    rss_peak_mb: float
    rss_anon_mb: float
    sources: dict[str, SourceStats]
    returned: float
    processes: int = 1
    exact: dict[str, Any] = field(default_factory=dict)
    major_faults: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``--json`` prints and :func:`format_result` reads):
        percentiles instead of raw latencies, NaN for a percentile of no calls."""
        lat = self.latencies_ms
        return {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "processes": self.processes,
            "p50_ms": _pct(lat, 50),
            "p95_ms": _pct(lat, 95),
            "p99_ms": _pct(lat, 99),
            "qps": round(self.requests / self.seconds, 1) if self.seconds > 0 else 0.0,
            "rss_mb": round(self.rss_mb, 1),
            "rss_peak_mb": round(self.rss_peak_mb, 1),
            "rss_anon_mb": round(self.rss_anon_mb, 1),
            "mean_candidates": round(self.returned, 1),
            "major_faults": self.major_faults,
            "sources": {
                name: {
                    "ok": len(s.latencies),
                    "p50_ms": _pct(np.asarray(s.latencies), 50),
                    "p99_ms": _pct(np.asarray(s.latencies), 99),
                    "timeouts": s.timeouts,
                    "errors": s.errors,
                    "skipped": s.skipped,
                    "first_error": s.first_error,
                }
                for name, s in self.sources.items()
            },
            "exact": self.exact,
        }


def _pct(x: npt.NDArray[Any], q: float) -> float:
    return round(float(np.percentile(x, q)), 3) if len(x) else float("nan")


def run_bench(
    retriever: Any,
    requests: list[Request],
    concurrency: int,
    ready: Callable[[], Any] | None = None,
) -> BenchResult:
    """Warm up, then blend every request on ``concurrency`` threads; RSS read right after.

    ``ready`` is called between warm-up and timing (the multi-process bench's start line)."""
    for r in requests[:_WARM_UP]:
        retriever.blend(r)
    if ready is not None:
        ready()
    lat = np.zeros(len(requests))
    results: list[Any] = [None] * len(requests)
    cursor = iter(range(len(requests)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            t0 = time.perf_counter()
            results[i] = retriever.blend(requests[i])
            lat[i] = (time.perf_counter() - t0) * 1000.0

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    seconds = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
    rss, peak, anon = rss_mb(), rss_mb("VmHWM"), rss_mb("RssAnon")
    stats: dict[str, SourceStats] = {}
    for res in results:
        for rep in res.reports:
            s = stats.setdefault(rep.name, SourceStats())
            if rep.status == SourceStatus.OK:
                s.latencies.append(rep.latency_ms)
            elif rep.status == SourceStatus.TIMEOUT:
                s.timeouts += 1
            elif rep.status == SourceStatus.SKIPPED:
                s.skipped += 1
            else:
                s.errors += 1
                s.first_error = s.first_error or rep.error
    returned = float(np.mean([len(r) for r in results])) if results else 0.0
    return BenchResult(
        requests=len(requests),
        concurrency=concurrency,
        latencies_ms=lat,
        seconds=seconds,
        rss_mb=rss,
        rss_peak_mb=peak,
        rss_anon_mb=anon,
        sources=stats,
        returned=returned,
        major_faults=faults,
    )


def run_bench_processes(
    config: RetrievalConfig, requests: list[Request], concurrency: int, processes: int
) -> BenchResult:
    """The requests split over ``processes`` serving processes, ``concurrency`` threads each.

    How a Python service uses more than one core: the GIL serializes one process's Python work,
    while processes share the memory-mapped artifacts through the page cache. Every process
    loads and warms up its own retriever, then all start together; throughput is all requests
    over the slowest process's time, RSS the largest process's (``rss_anon_mb``: all private
    memory summed).
    """
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(processes)
    results: Any = ctx.Queue()
    workers = [
        ctx.Process(
            target=_serve_share,
            args=(config, requests[i::processes], concurrency, start, results),
            daemon=True,
        )
        for i in range(processes)
    ]
    for w in workers:
        w.start()
    parts: list[BenchResult] = []
    try:
        for _ in workers:
            part = results.get(timeout=600)
            if isinstance(part, BaseException):
                raise part
            parts.append(part)
    finally:
        start.abort()  # releases the others if one failed before the start line
        for w in workers:
            w.join(timeout=10)
            if w.is_alive():
                w.terminate()
    sources: dict[str, SourceStats] = {}
    for part in parts:
        for name, st in part.sources.items():
            acc = sources.setdefault(name, SourceStats())
            acc.latencies += st.latencies
            acc.timeouts += st.timeouts
            acc.errors += st.errors
            acc.skipped += st.skipped
            acc.first_error = acc.first_error or st.first_error
    return BenchResult(
        requests=sum(p.requests for p in parts),
        concurrency=concurrency,
        latencies_ms=np.concatenate([p.latencies_ms for p in parts]),
        seconds=max(p.seconds for p in parts),
        rss_mb=max(p.rss_mb for p in parts),
        rss_peak_mb=max(p.rss_peak_mb for p in parts),
        rss_anon_mb=sum(p.rss_anon_mb for p in parts),
        sources=sources,
        returned=float(np.mean([p.returned for p in parts])),
        processes=processes,
        major_faults=sum(p.major_faults for p in parts),
    )


def _serve_share(
    config: RetrievalConfig,
    requests: list[Request],
    concurrency: int,
    start: Any,
    results: Any,
) -> None:
    from retrieval.online.retriever import Retriever

    try:
        with Retriever(config) as retriever:
            results.put(run_bench(retriever, requests, concurrency, ready=start.wait))
    except BaseException as exc:  # the parent re-raises it
        results.put(exc)


def exact_reference(
    retriever: Any, requests: list[Request], k: int, max_queries: int = 200
) -> dict[str, Any]:
    """Exact top-k search over the ANN source's own item vectors, one thread, one query at a
    time: the exact backend's search (``sources.ann_exact``: one matrix-vector product and a
    partial sort) and, when faiss is installed, faiss's flat index (a blocked matmul with a
    fused top-k heap): the faster of the two is the reference the ANN time is compared with;
    then the ANN source on the same queries and its recall@k against the exact answer.
    """
    from sources.ann import AnnSource
    from sources.ann_exact import ExactSearch
    from sources.vector_index import unit_rows

    ann = next((s for s in retriever.sources if isinstance(s, AnnSource)), None)
    if ann is None:
        return {}
    queries: list[tuple[Request, npt.NDArray[np.float32], npt.NDArray[np.int32]]] = []
    for r in requests:
        full = retriever.request(r)
        try:
            v, exclude, _ = ann.query_vector(full)
        except Exception:  # a request the source skips has no reference either
            continue
        queries.append((full, unit_rows(v) if ann.metric == "angular" else v, exclude))
        if len(queries) >= max_queries:
            break
    if not queries:
        return {"source": ann.name, "queries": 0}
    x = np.asarray(ann.item_vectors(), dtype=np.float32)
    exact = ExactSearch(x, ann.metric, ann.dir / "item_factors.npy")
    flat = _faiss_flat(unit_rows(x) if ann.metric == "angular" else x, ann.metric)
    np_ms, flat_ms, ann_ms, recall = [], [], [], []
    with threadpool_limits(1):
        for full, q, exclude in queries:
            n = k + exclude.size
            t0 = time.perf_counter()
            top, _ = exact.search(q, n)
            np_ms.append((time.perf_counter() - t0) * 1000.0)
            if flat is not None:
                t0 = time.perf_counter()
                flat.search(np.ascontiguousarray(q[None, :], dtype=np.float32), n)
                flat_ms.append((time.perf_counter() - t0) * 1000.0)
            top = top[~np.isin(top, exclude)][:k]
            t0 = time.perf_counter()
            got, _ = ann.retrieve(full, k, Deadline.in_ms(10_000))
            ann_ms.append((time.perf_counter() - t0) * 1000.0)
            rows = ann.item_index().to_dense(got)
            recall.append(np.intersect1d(rows, top).size / max(top.size, 1))
    del exact, flat
    npx, an = np.asarray(np_ms), np.asarray(ann_ms)
    fl = np.asarray(flat_ms)
    best, method = (
        (fl, "faiss flat") if fl.size and np.median(fl) < np.median(npx) else (npx, "numpy")
    )
    return {
        "source": ann.name,
        "backend": getattr(ann, "backend", "annoy"),
        "queries": len(queries),
        "items": int(x.shape[0]),
        "k": k,
        "exact_method": method,
        "exact_p50_ms": _pct(best, 50),
        "exact_p99_ms": _pct(best, 99),
        "exact_numpy_p50_ms": _pct(npx, 50),
        "exact_faiss_flat_p50_ms": _pct(fl, 50),
        "ann_p50_ms": _pct(an, 50),
        "ann_p99_ms": _pct(an, 99),
        "exact_over_ann_p50": round(float(np.median(best) / max(np.median(an), 1e-9)), 2),
        f"recall_at_{k}": round(float(np.mean(recall)), 4),
    }


def _faiss_flat(x: npt.NDArray[np.float32], metric: str) -> Any:
    """faiss's exact index over ``x`` on one OpenMP thread, or None without faiss."""
    from sources.ann_faiss import require_faiss

    try:
        faiss = require_faiss()
    except ArtifactError:
        return None
    faiss.omp_set_num_threads(1)
    index = (
        faiss.IndexFlatL2(x.shape[1]) if metric == "euclidean" else faiss.IndexFlatIP(x.shape[1])
    )
    index.add(np.ascontiguousarray(x))
    return index


def format_result(d: dict[str, Any]) -> str:
    """The human-readable report of a :meth:`BenchResult.to_dict` document. It takes the dict,
    not the result, so a saved ``--json-out`` file renders the same way."""
    processes = d.get("processes", 1)
    where = "" if processes == 1 else f" in each of {processes} processes"
    whose = "process RSS" if processes == 1 else "largest process's RSS"
    private = "private" if processes == 1 else f"private in all {processes} processes together"
    lines = [
        f"blend(): {d['requests']} requests at concurrency {d['concurrency']}{where}: "
        f"p50 {d['p50_ms']:.2f} ms  p95 {d['p95_ms']:.2f} ms  p99 {d['p99_ms']:.2f} ms  "
        f"{d['qps']:.0f} blends/s  ({d['mean_candidates']:.0f} candidates on average)",
        f"{whose} after warm-up and the run: {d['rss_mb']:.0f} MB; "
        f"{d['rss_anon_mb']:.0f} MB {private} (the rest: mmapped artifacts in the shared page "
        f"cache); peak {d['rss_peak_mb']:.0f} MB",
        f"major page faults during the run: {d.get('major_faults', 0)} (pages read from disk; "
        "one taken while holding the GIL stalls every thread of its process)",
        f"{'source':<14} {'p50 ms':>8} {'p99 ms':>8} {'timeouts':>9} {'errors':>7} {'skipped':>8}",
    ]
    for name, s in d["sources"].items():
        lines.append(
            f"{name:<14} {s['p50_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['timeouts']:>9} "
            f"{s['errors']:>7} {s['skipped']:>8}"
        )
    for name, s in d["sources"].items():
        if s.get("first_error"):
            lines.append(f"{name}: first error: {s['first_error']}")
    e = d.get("exact") or {}
    if e.get("queries"):
        rk = next(key for key in e if key.startswith("recall_at_"))
        method = e.get("exact_method", "numpy")
        other = ""
        if e.get("exact_faiss_flat_p50_ms") == e.get("exact_faiss_flat_p50_ms"):  # not NaN
            other = (
                f" (numpy p50 {e['exact_numpy_p50_ms']:.2f} ms, faiss flat p50 "
                f"{e['exact_faiss_flat_p50_ms']:.2f} ms)"
            )
        lines.append(
            f"exact top-{e['k']} inner product over {e['items']:,} items ({method}, 1 thread, "
            f"{e['queries']} queries): p50 {e['exact_p50_ms']:.2f} ms  p99 "
            f"{e['exact_p99_ms']:.2f} ms; {e['source']} ({e['backend']}) p50 "
            f"{e['ann_p50_ms']:.2f} ms  p99 {e['ann_p99_ms']:.2f} ms: exact/ann = "
            f"{e['exact_over_ann_p50']:.1f}x; {rk.replace('_at_', '@')} {e[rk]:.3f}{other}"
        )
    return "\n".join(lines)
