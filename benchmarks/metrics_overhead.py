"""What the Prometheus sink costs a blend: the same requests through one Retriever with and
without ``PrometheusMetrics``, in alternating blocks, plus the sink's own time per result.

    python benchmarks/metrics_overhead.py CONFIG --artifacts BUILD [--events LOG]
        [--requests 2000] [--rounds 6] [--multiprocess]

``--multiprocess`` sets ``PROMETHEUS_MULTIPROC_DIR`` first, as ``retrieval serve`` does: its
values live in memory-mapped files and each update takes a lock, so it is the dearer mode.
Prints the blend p50/mean with and without, and ``observe`` per result as a share of a blend.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", type=Path)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--events", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--multiprocess", action="store_true")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    if args.multiprocess:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-bench-")

    from prometheus_client import CollectorRegistry

    from retrieval import Retriever
    from retrieval.config import load_config
    from retrieval.metrics import PrometheusMetrics
    from retrieval.tools.bench import sample_requests

    config = load_config(args.config).model_copy(update={"artifacts": args.artifacts.resolve()})
    requests = sample_requests(config, args.artifacts.resolve(), args.events, args.requests)
    sink = PrometheusMetrics(CollectorRegistry())
    times: dict[str, list[float]] = {"off": [], "on": []}
    results = []
    with Retriever(config) as retriever:
        for r in requests[:200]:  # warm both paths
            retriever.blend(r)
        for round_ in range(args.rounds):
            # Alternate which goes first, so neither gets the warmer caches every round.
            for mode in ("off", "on") if round_ % 2 == 0 else ("on", "off"):
                retriever.metrics = sink if mode == "on" else None
                for r in requests:
                    t0 = time.perf_counter()
                    res = retriever.blend(r)
                    times[mode].append(time.perf_counter() - t0)
                    if mode == "off" and len(results) < len(requests):
                        results.append(res)
        retriever.metrics = None
    t0 = time.perf_counter()
    for _ in range(5):
        for res in results:
            sink.observe(res)
    observe_us = (time.perf_counter() - t0) / (5 * len(results)) * 1e6
    out: dict[str, object] = {"multiprocess": args.multiprocess, "requests": len(requests)}
    for mode, xs in times.items():
        a = np.asarray(xs) * 1000
        p50, p99, mean = (float(np.percentile(a, 50)), float(np.percentile(a, 99)), a.mean())
        out[mode] = {"p50_ms": round(p50, 4), "p99_ms": round(p99, 4), "mean_ms": round(mean, 4)}
        print(f"metrics {mode:3}  p50 {p50:.3f} ms  p99 {p99:.3f} ms  mean {mean:.3f} ms")
    mean_off = float(np.mean(times["off"])) * 1000
    out["observe_us"] = round(observe_us, 2)
    out["observe_share_of_blend_pct"] = round(observe_us / 10 / mean_off, 2)
    print(
        f"observe() {observe_us:.1f} us per result = {out['observe_share_of_blend_pct']}% of a "
        f"{mean_off:.3f} ms blend (multiprocess: {args.multiprocess})"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
