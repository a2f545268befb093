"""Blender overhead: 4 instant sources x 1,000 candidates (50% overlap) merged to 1,000 with rrf.

Prints p50/p99 of the whole ``blend()`` and of the merge alone. The baseline in the same run is a
no-op round trip through the thread pool, so the figures separate fan-out cost from merge cost.

    python benchmarks/blender_overhead.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import time

import numpy as np

from blender.fanout import Blender, SourceSlot
from blender.merge import SourceList, merge
from retrieval.types import Deadline, Request
from sources.base import Ranked, Source, SourceContext, SourceParams


class Precomputed(Source):
    """Returns a fixed list: measures the blender, not a source."""

    def __init__(self, name: str, ids: np.ndarray) -> None:
        super().__init__(name, SourceParams(), SourceContext())
        self.ids = ids
        self.scores = np.linspace(1.0, 0.0, ids.size, dtype=np.float32)

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        return self.ids[:k], self.scores[:k]


def pct(xs: list[float]) -> str:
    a = np.asarray(xs) * 1000
    return f"p50 {np.percentile(a, 50):.3f} ms  p99 {np.percentile(a, 99):.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    shared = rng.choice(10_000_000, 2000, replace=False).astype(np.int64)
    lists = []
    for j in range(4):
        own = rng.choice(10_000_000, 500, replace=False).astype(np.int64) + 10_000_000 * (j + 1)
        mixed = np.concatenate([shared[j * 300 : j * 300 + 500], own])  # 50% shared
        lists.append(rng.permutation(mixed))
    sources = [Precomputed(f"s{j}", ids) for j, ids in enumerate(lists)]
    blender = Blender(
        [SourceSlot(s) for s in sources], k=1000, deadline_ms=50, strategy="rrf", exclude_seen=True
    )
    request = Request(user_id=1, history=tuple(int(x) for x in lists[0][:20]))
    for _ in range(200):
        blender.blend(request)

    whole = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        res = blender.blend(request)
        whole.append(time.perf_counter() - t0)
    assert len(res) == 1000

    prepared = [SourceList(s.ids, s.scores, np.arange(s.ids.size, dtype=np.int32)) for s in sources]
    merge_only = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        merge(prepared, 1000, "rrf", 60.0)
        merge_only.append(time.perf_counter() - t0)

    pool = cf.ThreadPoolExecutor(4)
    noop = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        cf.wait([pool.submit(int) for _ in range(4)])
        noop.append(time.perf_counter() - t0)
    pool.shutdown()
    blender.close()

    print(f"calls: {args.calls}, sources: 4 x 1000 (50% overlap), k=1000, rrf")
    print(f"whole blend():          {pct(whole)}")
    print(f"merge alone:            {pct(merge_only)}")
    print(f"baseline pool no-op x4: {pct(noop)}")


if __name__ == "__main__":
    main()
