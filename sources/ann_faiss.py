"""The faiss IVF backend of the ann source: the one that reaches k = 1,000 over millions of items.

annoy needs to visit far more nodes than exact search to reach recall 0.95 at k = 1,000 (issue
6); an inverted-file index scans only the ``nprobe`` lists nearest the query. Lists come from
spherical k-means on a sample, then every list larger than ``_SPLIT_FACTOR`` x the mean is split
by a k-means of its own members: clustered catalogues otherwise put several times the mean in
a few lists, and the queries that hit them set the p99.

Storage is ``flat`` (float32, exact scores) or ``sq8`` (one byte per dimension, 4x smaller,
scores approximate, so the best ``rerank`` candidates are re-scored exactly from the item
vectors). The index file is memory-mapped at load (``IO_FLAG_MMAP_IFC``): serving processes
share the page cache and the private RSS stays small.

``FaissIVF`` is a ``sources.vector_index.VectorIndex``: it picks ``nprobe`` per query (configured,
or the build's calibrated value scaled to ``k``, turned down when the deadline is close) and
returns the ann source's scores (re-ranked exactly for sq8).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from retrieval.artifacts import ArtifactError, map_in_full
from retrieval.types import Deadline
from sources.ann_exact import exact_top_k
from sources.vector_index import SELF_CHECK_TOL, scaled_to_deadline, unit_rows

__all__ = [
    "INDEX",
    "FaissIVF",
    "build_ivf",
    "calibrate_nprobe",
    "check_sidecar",
    "default_nlist",
    "default_nprobe",
    "require_faiss",
]

INDEX = "index.faiss"
_TRAIN_PER_LIST = 40  # sample points per list for k-means (faiss warns under 39)
_TRAIN_MAX = 600_000  # k-means cost is sample x nlist: this keeps 10M items to minutes
_SPLIT_FACTOR = 2.0  # lists larger than this x the mean are split
_ADD_CHUNK = 262_144
_KMEANS_ITER = 12

Storage = Literal["flat", "sq8"]


def require_faiss() -> Any:
    """faiss, or a clear message about the missing dependency; its BLAS told the CPU's core
    type first (``_match_blas_core``)."""
    if "faiss" not in sys.modules:
        _match_blas_core()
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise ArtifactError(
            "the ann source's faiss backend needs faiss-cpu: pip install faiss-cpu"
        ) from exc
    return faiss


# The cores an older OpenBLAS (faiss-cpu bundles 0.3.15) knows by name, for the names numpy's
# newer OpenBLAS may give: a newer core runs the kernels of the older one it extends.
_KNOWN_CORES = {
    "haswell": "Haswell",
    "skylakex": "SkylakeX",
    "cooperlake": "Cooperlake",
    "sapphirerapids": "SkylakeX",
    "zen": "Zen",
}


def _match_blas_core() -> None:
    """Tell the OpenBLAS faiss loads the core type numpy's OpenBLAS detected.

    faiss-cpu's wheels bundle an older OpenBLAS than numpy's. On a VM that hides the CPU model
    (here: "Intel(R) Xeon(R) Processor") it falls back to its generic SSE3 kernels, and k-means
    and list assignment, most of a 10M-item ANN build, ran 2.4x slower (benchmarks/README.md).
    ``OPENBLAS_CORETYPE`` is read once, when faiss loads, so this must run before; a value
    already set is the user's and is left alone, and nothing is set without an OpenBLAS under
    numpy or for a core ``_KNOWN_CORES`` does not map."""
    if "OPENBLAS_CORETYPE" in os.environ:
        return
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool.get("internal_api") == "openblas":
            core = _KNOWN_CORES.get(str(pool.get("architecture", "")).lower())
            if core is not None:
                os.environ["OPENBLAS_CORETYPE"] = core
                return


def default_nlist(n: int) -> int:
    """~4 sqrt(n) lists: the coarse search stays ~1% of a full scan, lists hold ~sqrt(n)/4."""
    return max(1, min(n // 8 if n >= 8 else 1, round(4 * math.sqrt(n))))


def default_nprobe(nlist: int, n: int, k: int = 1000) -> int:
    """Lists to scan: enough to see ~40 k vectors, at least 1/32 of the lists (what clustered
    vectors at 1M needed for recall@1000 near 0.95: benchmarks/README.md)."""
    per_list = max(n / max(nlist, 1), 1.0)
    want = max(math.ceil(40 * k / per_list), math.ceil(nlist / 32))
    return int(min(nlist, max(1, want)))


def _rows(
    x: npt.NDArray[Any], lo: int, hi: int, unit: bool, lift: float | None = None
) -> npt.NDArray[np.float32]:
    chunk = np.ascontiguousarray(x[lo:hi], dtype=np.float32)
    if lift is not None:
        return lifted(chunk, lift)
    return unit_rows(chunk) if unit else chunk


def lifted(x: npt.NDArray[np.float32], max_norm: float) -> npt.NDArray[np.float32]:
    """Item vectors with one more coordinate, sqrt(max_norm^2 - |x|^2), so that every row has
    the norm ``max_norm`` and the largest inner product with a query (whose extra coordinate
    is 0) is the smallest L2 distance: maximum inner product search as plain nearest
    neighbours (Bachrach et al. 2014). k-means then clusters the rows by where they are, not
    only by their direction, and an IVF over ALS factors needs ~8x fewer lists for the same
    recall (benchmarks/README.md)."""
    x = np.asarray(x, dtype=np.float32)
    sq = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    extra = np.sqrt(np.maximum(max_norm * max_norm - sq, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.hstack([x, extra[:, None]]), dtype=np.float32)


def _max_norm(x: npt.NDArray[Any]) -> float:
    best = 0.0
    for lo in range(0, x.shape[0], _ADD_CHUNK):
        chunk = np.asarray(x[lo : lo + _ADD_CHUNK], dtype=np.float32)
        best = max(best, float(np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64).max()))
    return math.sqrt(best) * (1.0 + 1e-6)  # rounding never makes a row longer than this


def _kmeans(faiss: Any, x: npt.NDArray[np.float32], k: int, spherical: bool, seed: int) -> Any:
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=_KMEANS_ITER,
        spherical=spherical,
        seed=seed,
        max_points_per_centroid=1 << 30,
        min_points_per_centroid=1,  # only silences faiss's "please provide at least" warning:
        verbose=False,  # re-splitting a list of ~90 sample points in 3 printed 400 of them
    )
    km.train(x)
    return km.centroids


def _balanced_centroids(
    faiss: Any,
    sample: npt.NDArray[np.float32],
    nlist: int,
    spherical: bool,
    seed: int,
    balance: bool,
) -> npt.NDArray[np.float32]:
    """k-means centroids; with ``balance``, oversized clusters re-split by their own k-means."""
    centroids = np.asarray(_kmeans(faiss, sample, nlist, spherical, seed), dtype=np.float32)
    if not balance or nlist < 2:
        return centroids
    quant = faiss.IndexFlatIP(sample.shape[1]) if spherical else faiss.IndexFlatL2(sample.shape[1])
    quant.add(centroids)
    _, assign = quant.search(sample, 1)
    assign = assign[:, 0]
    sizes = np.bincount(assign, minlength=nlist)
    mean = sample.shape[0] / nlist
    keep = [centroids[sizes <= _SPLIT_FACTOR * mean]]
    for c in np.flatnonzero(sizes > _SPLIT_FACTOR * mean).tolist():
        members = sample[assign == c]
        parts = min(math.ceil(sizes[c] / mean), members.shape[0])
        keep.append(np.asarray(_kmeans(faiss, members, parts, spherical, seed + c), np.float32))
    return np.ascontiguousarray(np.concatenate(keep), dtype=np.float32)


def build_ivf(
    x: npt.NDArray[Any],
    metric: str,
    path: Path,
    *,
    nlist: int | None,
    storage: Storage,
    balance: bool,
    seed: int,
    queries: npt.NDArray[np.float32] | None = None,
    k: int = 1000,
    target_recall: float = 0.97,
) -> dict[str, Any]:
    """Train, fill and write the index; return what the sidecar records about it (with the
    calibrated nprobe when ``queries`` are given).

    ``x`` may be a memory map: it is read in chunks, normalised per chunk for ``angular``.
    """
    faiss = require_faiss()
    n, dims = x.shape
    unit = metric == "angular"
    # dot is searched as L2 over lifted rows (``lifted``); angular as inner product of unit rows.
    lift = _max_norm(x) if metric == "dot" else None
    spherical = metric == "angular"
    fmetric = faiss.METRIC_INNER_PRODUCT if metric == "angular" else faiss.METRIC_L2
    want = nlist or default_nlist(n)
    want = max(1, min(want, n))
    rng = np.random.default_rng(seed)
    m = min(n, max(_TRAIN_PER_LIST * want, 10_000), _TRAIN_MAX)
    picks = np.sort(rng.choice(n, size=m, replace=False))
    sample = _rows(x[picks], 0, m, unit, lift)
    want = min(want, max(1, m // 8))
    centroids = _balanced_centroids(faiss, sample, want, spherical, seed, balance)
    del sample
    real = centroids.shape[0]
    dims = centroids.shape[1]  # one more for dot
    quant = faiss.IndexFlatL2(dims) if fmetric == faiss.METRIC_L2 else faiss.IndexFlatIP(dims)
    quant.add(centroids)
    if storage == "flat":
        index = faiss.IndexIVFFlat(quant, dims, real, fmetric)
    else:
        index = faiss.IndexIVFScalarQuantizer(
            quant, dims, real, faiss.ScalarQuantizer.QT_8bit, fmetric
        )
        # SQ8 ranges trained on a fresh sample (the quantiser is the centroids above).
        train = x[np.sort(rng.choice(n, min(n, 100_000), replace=False))]
        index.train(_rows(train, 0, train.shape[0], unit, lift))
    index.own_fields = False
    index.is_trained = True
    for lo in range(0, n, _ADD_CHUNK):
        index.add(_rows(x, lo, min(n, lo + _ADD_CHUNK), unit, lift))
    calibration: dict[str, Any] = {}
    if queries is not None and queries.shape[0] > 0:
        q = unit_rows(queries) if unit else np.asarray(queries, np.float32)
        calibration = calibrate_nprobe(index, x, q, k, target_recall, metric, lift)
    faiss.write_index(index, str(path))
    sizes = np.array([index.invlists.list_size(i) for i in range(real)], dtype=np.int64)
    return {
        "nlist": int(real),
        "storage": storage,
        "index_bytes": path.stat().st_size,
        "faiss_version": faiss.__version__,
        "list_size_mean": round(float(sizes.mean()), 1),
        "list_size_max": int(sizes.max()),
        "list_size_p99": int(np.percentile(sizes, 99)),
        **({} if lift is None else {"lift": lift}),
        **calibration,
    }


def calibrate_nprobe(
    index: Any,
    x: npt.NDArray[Any],
    queries: npt.NDArray[np.float32],
    k: int,
    target: float,
    metric: str,
    lift: float | None = None,
) -> dict[str, Any]:
    """The smallest nprobe (doubling, then bisecting) whose mean recall@k against exact search
    reaches ``target`` on ``queries``: what a catalogue needs is measured at build, not assumed.

    How many lists a query must scan depends on how clustered the vectors are, not just on
    their number: at 1M items clustered vectors needed several times the lists the synthetic
    embeddings did for the same recall (benchmarks/README.md).
    """
    faiss = require_faiss()
    nlist = int(faiss.extract_index_ivf(index).nlist)
    k = min(k, x.shape[0])
    truth, _ = exact_top_k(x, queries, k, metric)
    asked = queries if lift is None else _lift_queries(queries)
    tried: dict[int, float] = {}

    def recall_at(nprobe: int) -> float:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        _, got = index.search(asked, k, params=params)
        hits = [np.intersect1d(g[g >= 0], t).size for g, t in zip(got, truth, strict=True)]
        tried[nprobe] = round(float(np.mean(hits)) / k, 4)
        return float(np.mean(hits)) / k

    nprobe, below = 1, 0
    while recall_at(nprobe) < target and nprobe < nlist:
        below, nprobe = nprobe, min(nlist, nprobe * 2)
    # Doubling overshoots by up to 2x (and the query cost with it): bisect down to ~1/8.
    while below and nprobe - below > max(1, nprobe // 8):
        mid = (below + nprobe) // 2
        if recall_at(mid) >= target:
            nprobe = mid
        else:
            below = mid
    recall = tried[nprobe]
    return {
        "nprobe": nprobe,
        "nprobe_recall": round(recall, 4),
        "nprobe_target": target,
        "nprobe_queries": int(queries.shape[0]),
        "nprobe_tried": {str(n): r for n, r in tried.items()},
    }


def _lift_queries(q: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    q = np.asarray(q, dtype=np.float32).reshape(-1, q.shape[-1])
    return np.ascontiguousarray(np.hstack([q, np.zeros((q.shape[0], 1), np.float32)]))


def check_sidecar(meta: Mapping[str, Any], directory: Path, sidecar: Path) -> None:
    """The faiss backend's sidecar keys (the index file itself is checked when it is opened)."""
    for key in ("max_timestamp", "index_bytes", "own_ids", "user_factors", "nlist"):
        if key not in meta:
            raise ArtifactError(f"{sidecar}: missing {key!r}; rebuild")
    if not isinstance(meta["nlist"], int) or meta["nlist"] <= 0:
        raise ArtifactError(f"{sidecar}: nlist must be a positive integer")


class FaissIVF:
    """A loaded IVF index over ``items`` (the build's item vectors, memory-mapped).

    ``nprobe``: the configured lists per query, else the build's calibrated value (measured for
    ``calibration_k`` results, scaled up for more), else a size-derived default. ``rerank``: with
    sq8 storage, this many candidates are re-scored exactly from ``items``. ``search`` is
    thread-safe (faiss reads, each call its own params).
    """

    def __init__(
        self,
        path: Path,
        meta: Mapping[str, Any],
        items: npt.NDArray[Any],
        *,
        nprobe: int | None = None,
        rerank: int = 0,
        calibration_k: int = 1000,
    ) -> None:
        self.faiss = require_faiss()
        self.path = path
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ArtifactError(f"{path}: missing ({exc}); rebuild") from exc
        if size != meta["index_bytes"]:
            raise ArtifactError(
                f"{path}: {size} bytes, the sidecar says {meta['index_bytes']}; the file is "
                "damaged or from another build"
            )
        # MMAP_IFC maps the codes in place (zero copy); plain MMAP wraps them in on-disk lists
        # that start prefetch threads per query: several times slower (benchmarks/README.md).
        flag = getattr(self.faiss, "IO_FLAG_MMAP_IFC", self.faiss.IO_FLAG_MMAP)
        try:
            index = self.faiss.read_index(str(path), flag)
        except RuntimeError as exc:
            raise ArtifactError(f"{path}: faiss cannot read it ({exc}); rebuild") from exc
        map_in_full(path)
        ivf = self.faiss.try_extract_index_ivf(index)
        lift = meta.get("lift")  # dot over lifted rows (builds before it: inner product)
        self.lift: float | None = float(lift) if isinstance(lift, (int, float)) else None
        dims = meta["dims"] + (0 if self.lift is None else 1)
        if ivf is None or index.d != dims or index.ntotal != meta["n_items"]:
            raise ArtifactError(
                f"{path}: index has d={index.d}, {index.ntotal} items; the sidecar says "
                f"{dims} dims, {meta['n_items']} items: rebuild"
            )
        if ivf.nlist != meta["nlist"]:
            raise ArtifactError(f"{path}: nlist {ivf.nlist}, the sidecar says {meta['nlist']}")
        self.index: Any = index
        self.ivf: Any = ivf
        self.nlist = int(ivf.nlist)
        self.l2 = index.metric_type == self.faiss.METRIC_L2
        self.n_items = int(meta["n_items"])
        self.metric: str = meta["metric"]
        self.items = items
        self.configured_nprobe = nprobe
        self.calibrated: Any = meta.get("nprobe")  # absent from builds before calibration
        self.calibration_k = calibration_k
        self.rerank = rerank if meta.get("storage") == "sq8" else 0
        self._self_check()

    def _self_check(self) -> None:
        """Item 0's own list holds it: one probe must find it (or a twin at the same score)."""
        v = np.asarray(self.items[0], dtype=np.float32)
        if self.metric == "angular":
            v = unit_rows(v)
        rows, raw = self.search_raw(v, min(10, self.n_items), nprobe=1)
        ok = rows.size > 0 and bool(np.isfinite(raw).all())
        if ok and self.metric != "dot":
            own = 0.0 if self.l2 else float(v @ v)
            tol = SELF_CHECK_TOL * (float(v @ v) + 1e-12)
            ok = 0 in rows.tolist() or abs(float(raw[0]) - own) <= tol
        if not ok:
            raise ArtifactError(
                f"{self.path}: self-check failed (item 0 not found from its own "
                "vector); the index does not match item_factors.npy: rebuild"
            )

    def nprobe(self, k: int, deadline: Deadline | None = None) -> int:
        """Lists to scan for ``k`` results (configured, or derived from the calibration and
        ``k``), shrunk in proportion when the deadline is close."""
        full = self.configured_nprobe or self._calibrated_nprobe(k)
        return scaled_to_deadline(full, deadline, floor=1)

    def _calibrated_nprobe(self, k: int) -> int:
        """The build's measured nprobe (for ``calibration_k``; scaled up for a larger ``k``), or
        the size-derived default for an index built before calibration existed."""
        measured = self.calibrated
        if not isinstance(measured, int) or measured < 1:
            return default_nprobe(self.nlist, self.n_items, k)
        return min(self.nlist, max(measured, math.ceil(measured * k / self.calibration_k)))

    def search_raw(
        self, v: npt.NDArray[np.float32], n: int, nprobe: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Top ``n`` rows and raw faiss scores (inner product, or squared L2 distance; over
        lifted rows for dot)."""
        # OpenMP's thread count is per calling thread: one thread for one query is fastest.
        self.faiss.omp_set_num_threads(1)
        params = self.faiss.SearchParametersIVF(nprobe=max(1, min(nprobe, self.nlist)))
        q = v.reshape(1, -1) if self.lift is None else _lift_queries(v)
        dist, rows = self.index.search(q, n, params=params)
        found = rows[0] >= 0
        return rows[0][found].astype(np.int64), dist[0][found].astype(np.float32)

    def search(
        self, query: npt.NDArray[np.float32], k: int, deadline: Deadline | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Rows and scores on the source's scale (cosine, dot, -distance); sq8 re-ranked
        exactly."""
        v = query
        m = min(self.n_items, max(k, self.rerank)) if self.rerank else k
        rows, raw = self.search_raw(v, m, self.nprobe(k, deadline))
        if not self.rerank:
            return rows, self._scores(v, raw)
        rows = np.sort(rows)  # ascending offsets: the gather from the mmap reads forwards
        y = np.asarray(self.items[rows], dtype=np.float32)
        if self.metric == "angular":
            y = unit_rows(y)
        if self.metric == "euclidean":
            exact = -np.linalg.norm(y - v, axis=1).astype(np.float32)
        else:
            exact = (y @ v).astype(np.float32)
        top = np.argsort(-exact, kind="stable")[:k]
        return rows[top], exact[top]

    def _scores(self, v: npt.NDArray[np.float32], raw: npt.NDArray[np.float32]) -> Any:
        """faiss's raw scores on the source's scale: the inner product back from the lifted
        distance, |q|^2 + lift^2 - 2 q.x (in float64: the two large terms cancel), or
        -distance for euclidean."""
        if self.lift is not None:
            qq = float(np.dot(v.astype(np.float64), v.astype(np.float64)))
            return ((qq + self.lift * self.lift - raw.astype(np.float64)) / 2.0).astype(np.float32)
        return -np.sqrt(np.maximum(raw, 0.0)) if self.l2 else raw

    def close(self) -> None:
        """Drop the index (its memory map goes with the last reference)."""
        self.index = None
        self.ivf = None
