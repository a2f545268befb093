"""Recall@k and latency of a built faiss ANN source against exact search, for several nprobe.

Uses the bench's requests (sampled from the log) and its exact reference (numpy, one thread),
so the figures are those `retrieval bench` prints, at each nprobe in turn:

    PYTHONPATH=. python benchmarks/ann_nprobe.py CONFIG --artifacts DIR --events LOG \\
        [--nprobe 32 64 128 256] [--queries 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from retrieval.config import load_config
from retrieval.online.retriever import Retriever
from retrieval.tools.bench import exact_reference, sample_requests
from sources.ann import AnnSource
from sources.ann_faiss import FaissIVF


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("config", type=Path)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--events", type=Path, required=True)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    config = load_config(args.config).model_copy(update={"artifacts": args.artifacts.resolve()})
    requests = sample_requests(config, args.artifacts.resolve(), args.events, args.queries * 3)
    with Retriever(config) as retriever:
        ann = next(s for s in retriever.sources if isinstance(s, AnnSource))
        if not isinstance(ann.index, FaissIVF):
            raise SystemExit(f"source {ann.name!r} is not served by faiss")
        print(f"{ann.name}: nlist {ann.index.nlist}, {ann.n_items:,} items, k {config.k}")
        print(f"{'nprobe':>7} {'recall':>7} {'ann p50':>8} {'ann p99':>8} {'exact p99':>10}")
        for nprobe in args.nprobe:
            ann.index.configured_nprobe = nprobe
            r = exact_reference(retriever, requests, config.k, max_queries=args.queries)
            print(
                f"{nprobe:>7} {r[f'recall_at_{config.k}']:>7.3f} {r['ann_p50_ms']:>6.2f}ms "
                f"{r['ann_p99_ms']:>6.2f}ms {r['exact_p99_ms']:>8.1f}ms"
            )


if __name__ == "__main__":
    main()
