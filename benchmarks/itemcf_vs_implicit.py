"""Item-CF similarity: implicit's one-piece CosineRecommender fit vs the block path, same matrix.

    PYTHONPATH=. python benchmarks/itemcf_vs_implicit.py LOG [--cap 500|none] [--path both]

Each path runs in its own child process, so its peak RSS (reading the log included) is its own.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np


def one(log: Path, cap: int | None, path: str) -> None:
    from retrieval.offline.events import read_events
    from sources.itemcf import ItemCFParams, blockwise_similarity, user_item_matrix, weighted_matrix

    events = read_events(log)
    m = user_item_matrix(events, ItemCFParams().event_weights, cap)
    del events
    flops = float((np.diff(m.indptr).astype(np.float64) ** 2).sum())
    t = time.perf_counter()
    if path == "implicit":
        from implicit.nearest_neighbours import CosineRecommender
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            CosineRecommender(K=101).fit(m, show_progress=False)
    else:
        blockwise_similarity(weighted_matrix(m, "cosine"), 100)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{path:<9} cap {cap}: {m.shape[1]:,} items, {m.nnz:,} interactions, "
        f"{flops / 1e9:.2f}G multiply-adds: {seconds:.1f} s, peak RSS {peak:.0f} MB",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("log", type=Path)
    ap.add_argument("--cap", default="500", help="max_user_items, or none")
    ap.add_argument("--path", choices=["both", "implicit", "blocks"], default="both")
    args = ap.parse_args()
    cap = None if args.cap == "none" else int(args.cap)
    if args.path != "both":
        one(args.log, cap, args.path)
        return
    for path in ("blocks", "implicit"):
        cmd = [sys.executable, __file__, str(args.log), "--cap", args.cap, "--path", path]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
