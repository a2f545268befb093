"""ANN backends side by side on clustered unit vectors: build time, recall@k and latency.

    python benchmarks/ann_backends.py --items 1000000 --dims 64 [--queries 200] [--backends ...]

Recall is measured against exact inner-product search (numpy matmul + argpartition) on the same
queries; every backend runs one query at a time on one thread, as the ann source does.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from sources.ann_exact import exact_top_k
from sources.vector_index import unit_rows

F32 = npt.NDArray[np.float32]


def clustered(n: int, dims: int, seed: int = 0) -> F32:
    """Unit vectors around sqrt(n) Zipf-sized cluster centres (real embeddings are lumpy)."""
    rng = np.random.default_rng(seed)
    n_c = max(8, int(np.sqrt(n)))
    centres = rng.normal(size=(n_c, dims)).astype(np.float32)
    p = 1.0 / np.arange(1, n_c + 1) ** 0.7
    assign = rng.choice(n_c, size=n, p=p / p.sum())
    x = np.empty((n, dims), np.float32)
    for s in range(0, n, 500_000):
        a = assign[s : s + 500_000]
        x[s : s + a.size] = centres[a] + 0.6 * rng.normal(size=(a.size, dims)).astype(np.float32)
    return unit_rows(x)


def exact(x: F32, q: F32, k: int) -> tuple[list[npt.NDArray[np.int64]], float]:
    out, t = [], []
    for v in q:
        t0 = time.perf_counter()
        top, _ = exact_top_k(x, v, k, "dot")
        t.append(time.perf_counter() - t0)
        out.append(top)
    return out, float(np.percentile(np.array(t) * 1000, 99))


def report(
    name: str,
    build_s: float,
    search: Callable[[F32], npt.NDArray[np.int64]],
    q: F32,
    truth: list[npt.NDArray[np.int64]],
    k: int,
) -> None:
    for v in q[:10]:
        search(v)
    lat, rec = [], []
    for v, t in zip(q, truth, strict=True):
        t0 = time.perf_counter()
        got = search(v)
        lat.append((time.perf_counter() - t0) * 1000)
        rec.append(np.intersect1d(got, t).size / k)
    print(
        f"{name:<34} build {build_s:7.1f}s  recall@{k} {np.mean(rec):.3f}  "
        f"p50 {np.percentile(lat, 50):6.2f} ms  p99 {np.percentile(lat, 99):6.2f} ms",
        flush=True,
    )


def bench_faiss(x: F32, q: F32, truth: list[npt.NDArray[np.int64]], k: int, nlist: int) -> None:
    from sources.ann_faiss import require_faiss

    faiss = require_faiss()
    faiss.omp_set_num_threads(2)  # training and adding may use both cores
    for spec in (f"IVF{nlist},Flat", f"IVF{nlist},SQ8"):
        t0 = time.perf_counter()
        index = faiss.index_factory(x.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(1)
        sample = x[np.sort(rng.choice(x.shape[0], min(x.shape[0], 64 * nlist), replace=False))]
        index.train(sample)
        index.add(x)
        build = time.perf_counter() - t0
        ivf = faiss.extract_index_ivf(index)
        sizes = np.array([ivf.invlists.list_size(i) for i in range(nlist)])
        skew = sizes.max() / sizes.mean()
        print(f"{spec}: list sizes mean {sizes.mean():.0f} max {sizes.max()} (skew x{skew:.1f})")
        faiss.omp_set_num_threads(1)
        for nprobe in (16, 32, 64, 128):
            ivf.nprobe = nprobe
            if spec.endswith("Flat"):

                def search(v: F32, index: faiss.Index = index) -> npt.NDArray[np.int64]:
                    return index.search(v[None, :], k)[1][0]

                report(f"{spec} nprobe {nprobe}", build, search, q, truth, k)
            else:

                def rerank(v: F32, index: faiss.Index = index) -> npt.NDArray[np.int64]:
                    cand = index.search(v[None, :], 2 * k)[1][0]
                    cand = cand[cand >= 0]
                    s = x[np.sort(cand)] @ v
                    return np.sort(cand)[np.argsort(-s)[:k]]

                report(f"{spec}+rerank2k nprobe {nprobe}", build, rerank, q, truth, k)
        faiss.omp_set_num_threads(2)


def bench_hnsw(x: F32, q: F32, truth: list[npt.NDArray[np.int64]], k: int) -> None:
    import hnswlib

    t0 = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=x.shape[1])
    index.init_index(max_elements=x.shape[0], M=16, ef_construction=100, random_seed=0)
    index.add_items(x, num_threads=2)
    build = time.perf_counter() - t0
    index.set_num_threads(1)
    for ef in (1000, 1500, 2000):
        index.set_ef(ef)

        def search(v: F32) -> npt.NDArray[np.int64]:
            return index.knn_query(v[None, :], k=k)[0][0].astype(np.int64)

        report(f"hnswlib M16 efc100 ef {ef}", build, search, q, truth, k)


def bench_annoy(x: F32, q: F32, truth: list[npt.NDArray[np.int64]], k: int) -> None:
    from annoy import AnnoyIndex

    t0 = time.perf_counter()
    index = AnnoyIndex(x.shape[1], "euclidean")
    for i, row in enumerate(x.tolist()):
        index.add_item(i, row)
    index.build(16, n_jobs=2)
    build = time.perf_counter() - t0
    for search_k in (16 * k, 16 * k * 4):

        def search(v: F32, sk: int = search_k) -> npt.NDArray[np.int64]:
            return np.asarray(index.get_nns_by_vector(v.tolist(), k, search_k=sk), np.int64)

        report(f"annoy 16 trees search_k {search_k}", build, search, q, truth, k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dims", type=int, default=64)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--nlist", type=int, default=0, help="default: 4 * sqrt(items)")
    ap.add_argument("--backends", nargs="*", default=["faiss", "hnswlib"])
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    x = clustered(args.items, args.dims)
    rng = np.random.default_rng(7)
    q = x[rng.choice(args.items, args.queries, replace=False)] + 0.3 * rng.normal(
        size=(args.queries, args.dims)
    ).astype(np.float32)
    q = unit_rows(q)
    with threadpool_limits(1):
        truth, p99 = exact(x, q, args.k)
    print(f"exact numpy: p99 {p99:.2f} ms ({args.items:,} x {args.dims})", flush=True)
    nlist = args.nlist or int(4 * np.sqrt(args.items))
    for b in args.backends:
        if b == "faiss":
            bench_faiss(x, q, truth, args.k, nlist)
        elif b == "hnswlib":
            bench_hnsw(x, q, truth, args.k)
        elif b == "annoy":
            bench_annoy(x, q, truth, args.k)


if __name__ == "__main__":
    main()
