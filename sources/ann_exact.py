"""The exact backend of the ann source: score every item, keep the top n.

Under ``sources.ann.EXACT_MAX_ITEMS`` items one matrix-vector product over the memory-mapped
item matrix plus an ``argpartition`` is as fast as a calibrated faiss IVF index at k = 1,000
(``benchmarks/ann_exact_vs_ivf.py``), needs no index file, no training and has recall 1.
numpy was kept over faiss's flat index: as fast at every size measured, and faiss would hold a
private copy of the vectors where numpy reads the shared page cache of ``item_factors.npy``.

``ExactSearch`` is a ``sources.vector_index.VectorIndex``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.artifacts import ArtifactError
from retrieval.types import Deadline

__all__ = ["ExactSearch", "check_sidecar", "exact_top_k"]

_CHUNK = 262_144  # rows read at a time while checking the matrix at load


def check_sidecar(meta: Mapping[str, Any], directory: Path, sidecar: Path) -> None:
    """The exact backend's sidecar keys (it has no index: ``item_factors.npy`` is checked when
    it is opened)."""
    for key in ("max_timestamp", "own_ids", "user_factors"):
        if key not in meta:
            raise ArtifactError(f"{sidecar}: missing {key!r}; rebuild")


def exact_top_k(
    items: npt.NDArray[Any],
    queries: npt.NDArray[np.float32],
    k: int,
    metric: str,
    *,
    inv_norm: npt.NDArray[np.float32] | None = None,
    sq_norm: npt.NDArray[np.float32] | None = None,
    chunk_rows: int = _CHUNK,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Exact top ``k`` rows of ``items`` for one query (``(d,)``: 1-D answers) or a batch
    (``(nq, d)``: one row of answers each), best first, with scores on the ann source's scale:
    inner product (``dot``), cosine (``angular``: queries must be unit vectors) or minus the
    euclidean distance. The one exact search: serving's exact backend, the faiss build's recall
    reference (nprobe calibration) and ``retrieval bench``'s baseline.

    ``items`` may be a memory map: it is read ``chunk_rows`` rows at a time, one matrix product
    per chunk for all queries, keeping each query's best ``k`` so far, so a 10M-row matrix is
    never copied whole. ``inv_norm`` (1/|x|, 0 for a zero row) and ``sq_norm`` (|x|^2) are the
    rows' norms when precomputed (serving computes them once at load), else computed per chunk.
    """
    q = np.asarray(queries, dtype=np.float32)
    q2 = q.reshape(1, -1) if q.ndim == 1 else q
    n = items.shape[0]
    k = max(0, min(k, n))
    rows = [np.empty(0, dtype=np.int64) for _ in range(q2.shape[0])]
    best = [np.empty(0, dtype=np.float32) for _ in range(q2.shape[0])]
    for lo in range(0, n if k else 0, chunk_rows):
        hi = min(n, lo + chunk_rows)
        chunk = np.asarray(items[lo:hi], dtype=np.float32)
        # queries x rows; for one query a gemv, as items @ v (a batch: one gemm, transposed)
        s = np.ascontiguousarray((chunk @ q2.T).T)
        if metric == "angular":
            s *= _inv_norms(chunk) if inv_norm is None else inv_norm[lo:hi]
        elif metric == "euclidean":
            sq = np.einsum("ij,ij->i", chunk, chunk) if sq_norm is None else sq_norm[lo:hi]
            s = 2.0 * s - sq  # |v|^2 - |x - v|^2: the same order as -|x - v|
        for j, sj in enumerate(s):  # each query's best k so far and this chunk's rows compete
            ids: npt.NDArray[np.int64] | None = None
            if best[j].size:
                sj = np.concatenate([best[j], sj])
                ids = np.concatenate([rows[j], np.arange(lo, hi, dtype=np.int64)])
            total = sj.size
            top = np.argpartition(sj, total - k)[total - k :] if k < total else np.arange(total)
            best[j] = sj[top]
            rows[j] = lo + top if ids is None else ids[top]
    for j, v in enumerate(q2):
        order = np.argsort(-best[j], kind="stable")
        rows[j] = rows[j][order].astype(np.int64, copy=False)
        best[j] = best[j][order]
        if metric == "euclidean":
            best[j] = -np.sqrt(np.maximum(float(v @ v) - best[j], 0.0))
        best[j] = best[j].astype(np.float32, copy=False)
    if q.ndim == 1:
        return rows[0], best[0]
    return np.stack(rows), np.stack(best)


def _inv_norms(chunk: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """1/|x| per row, 0 for a zero row (whose cosine is then 0, like a zero vector's)."""
    root = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
    return np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)


class ExactSearch:
    """Exact top-n by inner product, cosine (``angular``) or euclidean distance
    (``exact_top_k`` over the whole matrix).

    The matrix is checked once at load (finite values; a NaN row would poison every ranking
    silently) and its row norms kept, so cosine and distance cost one pass like the inner
    product. ``search`` only reads shared state: it is thread-safe.
    """

    def __init__(self, items: npt.NDArray[Any], metric: str, path: Path) -> None:
        n = items.shape[0]
        sq = np.empty(n, dtype=np.float32)
        for lo in range(0, n, _CHUNK):
            chunk = np.asarray(items[lo : lo + _CHUNK], dtype=np.float32)
            bad = ~np.isfinite(chunk).all(axis=1)
            if bad.any():
                row = lo + int(np.argmax(bad))
                raise ArtifactError(
                    f"{path}: row {row} has NaN or inf values; the file is damaged: rebuild"
                )
            sq[lo : lo + chunk.shape[0]] = np.einsum("ij,ij->i", chunk, chunk)
        self.items = items
        self.metric = metric
        self.n_items = n
        self._inv_norm: npt.NDArray[np.float32] | None = None
        self._sq: npt.NDArray[np.float32] | None = None
        if metric == "angular":  # zero rows score 0, like a zero vector's cosine
            root = np.sqrt(sq)
            self._inv_norm = np.divide(1.0, root, out=np.zeros_like(root), where=root > 0)
        elif metric == "euclidean":
            self._sq = sq

    def search(
        self, query: npt.NDArray[np.float32], k: int, deadline: Deadline | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Top ``k`` rows, best first, with scores on the source's scale: inner product, cosine
        (``query`` must be a unit vector) or minus the euclidean distance. Every item is scored
        whatever the deadline: there is no knob to turn down."""
        return exact_top_k(
            self.items,
            np.asarray(query, dtype=np.float32),
            k,
            self.metric,
            inv_norm=self._inv_norm,
            sq_norm=self._sq,
            chunk_rows=max(self.n_items, 1),  # serving: one pass, the matrix is mapped already
        )

    def close(self) -> None:
        """Nothing of its own to release: the matrix is the ann source's memory map."""
