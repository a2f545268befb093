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

__all__ = ["ExactSearch", "check_sidecar"]

_CHUNK = 262_144  # rows read at a time while checking the matrix at load


def check_sidecar(meta: Mapping[str, Any], directory: Path, sidecar: Path) -> None:
    """The exact backend's sidecar keys (it has no index: ``item_factors.npy`` is checked when
    it is opened)."""
    for key in ("max_timestamp", "own_ids", "user_factors"):
        if key not in meta:
            raise ArtifactError(f"{sidecar}: missing {key!r}; rebuild")


class ExactSearch:
    """Exact top-n by inner product, cosine (``angular``) or euclidean distance.

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
        v = np.asarray(query, dtype=np.float32)
        s = self.items @ v
        if self._inv_norm is not None:
            s *= self._inv_norm
        elif self._sq is not None:
            s = 2.0 * s - self._sq  # |v|^2 - |x - v|^2: the same order as -|x - v|
        total = s.shape[0]
        n = min(k, total)
        if n <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        top = np.argpartition(s, total - n)[total - n :] if n < total else np.arange(total)
        top = top[np.argsort(-s[top], kind="stable")]
        scores = s[top]
        if self._sq is not None:
            scores = -np.sqrt(np.maximum(float(v @ v) - scores, 0.0))
        return top.astype(np.int64), scores.astype(np.float32)

    def close(self) -> None:
        """Nothing of its own to release: the matrix is the ann source's memory map."""
