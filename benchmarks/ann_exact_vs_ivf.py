"""Exact inner-product search against calibrated faiss IVF at k = 1,000, by catalog size.

    python benchmarks/ann_exact_vs_ivf.py [--sizes 10000 50000 100000 200000 500000] \\
        [--dims 64] [--queries 200] [--k 1000]

For each size: p50/p99 latency of exact numpy (matmul + argpartition + sort), exact faiss
(``IndexFlatIP``: a scan with a fused top-k heap) and faiss IVF built by the ann source's own
``build_ivf`` with its build-time nprobe calibration (target recall 0.97, on a separate set of
queries), plus the IVF's recall@k against exact on the measured queries. One query at a time on
one thread, as the ann source serves. It is the measurement behind ``sources.ann.EXACT_MAX_ITEMS``
(the catalog size under which ``backend: auto`` serves exact search).

Vectors are ALS-like: Zipf-sized clusters of directions with log-normal norms (popular items get
long vectors), queries are weighted sums of a few items plus noise (a re-solved session).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from ann_backends import clustered  # a sibling script: benchmarks/ is on sys.path
from threadpoolctl import threadpool_limits

from sources.ann_exact import exact_top_k
from sources.ann_faiss import build_ivf, require_faiss

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


def als_like(n: int, dims: int, seed: int = 0) -> F32:
    """ann_backends' clustered unit directions times log-normal norms (ALS vectors are not unit)."""
    x = clustered(n, dims, seed)
    rng = np.random.default_rng([seed, 1])
    x *= rng.lognormal(0.0, 0.5, size=(n, 1)).astype(np.float32)
    return x


def queries(x: F32, m: int, seed: int) -> F32:
    """Sums of 1-5 random items' vectors with decaying weights, plus noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((m, x.shape[1]), np.float32)
    for j in range(m):
        rows = rng.choice(x.shape[0], size=int(rng.integers(1, 6)), replace=False)
        w = 0.9 ** np.arange(rows.size)
        out[j] = (w[:, None] * x[rows]).sum(axis=0)
    out += 0.2 * rng.normal(size=out.shape).astype(np.float32)
    return out


def exact_numpy(x: F32, v: F32, k: int) -> I64:
    return exact_top_k(x, v, k, "dot")[0]


def timed(search: Callable[[F32], I64], q: F32) -> tuple[list[I64], float, float]:
    for v in q[:10]:  # warm-up: page cache, BLAS, faiss's first-call allocations
        search(v)
    got, lat = [], []
    for v in q:
        t0 = time.perf_counter()
        got.append(search(v))
        lat.append((time.perf_counter() - t0) * 1000)
    return got, float(np.percentile(lat, 50)), float(np.percentile(lat, 99))


def recall_at(got: list[I64], truth: list[I64], k: int) -> float:
    return float(np.mean([np.intersect1d(g, t).size / k for g, t in zip(got, truth, strict=True)]))


def one_size(n: int, dims: int, m: int, k: int) -> None:
    faiss = require_faiss()
    x = als_like(n, dims)
    calib, q = queries(x, 200, seed=1), queries(x, m, seed=2)
    flat = faiss.IndexFlatIP(dims)
    flat.add(x)

    def exact_faiss(v: F32) -> I64:
        return np.asarray(flat.search(v[None, :], k)[1][0], dtype=np.int64)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(2)  # the build may use both cores
        meta = build_ivf(
            x,
            "dot",
            Path(tmp) / "index.faiss",
            nlist=None,
            storage="flat",
            balance=True,
            seed=0,
            queries=calib,
            k=k,
            target_recall=0.97,
        )
        build_s = time.perf_counter() - t0
        index = faiss.read_index(str(Path(tmp) / "index.faiss"), faiss.IO_FLAG_MMAP_IFC)
    faiss.omp_set_num_threads(1)
    params = faiss.SearchParametersIVF(nprobe=meta["nprobe"])

    lift = meta.get("lift")  # dot is searched over lifted rows (sources.ann_faiss.lifted)

    def ivf(v: F32) -> I64:
        w = v[None, :] if lift is None else np.append(v, np.float32(0))[None, :]
        return np.asarray(index.search(w, k, params=params)[1][0], dtype=np.int64)

    with threadpool_limits(1):
        truth, np50, np99 = timed(lambda v: exact_numpy(x, v, k), q)
        got_flat, f50, f99 = timed(exact_faiss, q)
        got_ivf, i50, i99 = timed(ivf, q)
    flat_recall = recall_at(got_flat, truth, k)
    recall = recall_at(got_ivf, truth, k)
    print(
        f"{n:>9,} | {np50:6.2f} {np99:6.2f} | {f50:6.2f} {f99:6.2f} (recall {flat_recall:.3f}) | "
        f"{i50:6.2f} {i99:6.2f} | nlist {meta['nlist']:>5} nprobe {meta['nprobe']:>4} "
        f"recall {recall:.3f} (calibration {meta['nprobe_recall']:.3f}) build {build_s:5.1f}s",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000, 200_000])
    ap.add_argument("--dims", type=int, default=64)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=1000)
    args = ap.parse_args()
    print(f"k {args.k}, {args.dims} dims, {args.queries} queries, one thread; latency ms p50 p99")
    print(f"{'items':>9} | exact numpy   | exact faiss flat              | faiss IVF (calibrated)")
    for n in args.sizes:
        one_size(n, args.dims, args.queries, args.k)


if __name__ == "__main__":
    main()
