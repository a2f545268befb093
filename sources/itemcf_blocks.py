"""Item-CF similarity block by block, for catalogues where implicit's one-piece fit cannot fit.

implicit's item-item models compute ``sim = W^T W`` (W: the weighted user x item matrix) in one
piece and hold every item's neighbours as 16-byte COO entries before converting: +3 GB at 1M
items, well over 16 GB at 10M (issue 6). Here a range of items (rows of ``W^T``) is multiplied
with the whole ``W`` by sparse_dot_topn, which keeps only each row's best entries while it
multiplies (C++, both cores), so no block ever holds its full product; the block is then cut
to our CSR format before the next starts. Memory is bounded by the block, not the catalogue.
Same weighting functions as implicit, so the neighbours are the same (tests/test_itemcf.py).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from retrieval.artifacts import CSR
from sources.neighbours import top_k_per_row

__all__ = ["BLOCK_ITEMS", "blockwise_similarity", "weighted_matrix"]

# Items per block: the block's kept entries (<= k + 1 per item, 8 bytes each) stay well under
# 1 GB at k = 100, and the per-block cut to CSR sorts no more than ~25M entries at once.
BLOCK_ITEMS = 250_000


def weighted_matrix(
    matrix: sp.csr_matrix,
    model: Literal["cosine", "bm25", "tfidf"],
    bm25_k1: float = 1.2,
    bm25_b: float = 0.75,
) -> sp.csr_matrix:
    """The user x item matrix W that implicit's model of this name multiplies: sim = W^T W."""
    from implicit.nearest_neighbours import bm25_weight, normalize, tfidf_weight

    if model == "cosine":
        w = normalize(matrix.T).T
    elif model == "bm25":
        w = bm25_weight(matrix.T, bm25_k1, bm25_b).T
    else:
        w = normalize(tfidf_weight(matrix.T)).T
    return sp.csr_matrix(w, dtype=np.float32)


def blockwise_similarity(
    w: sp.csr_matrix,
    k: int,
    block_items: int = BLOCK_ITEMS,
    progress: Callable[[float], None] | None = None,
) -> CSR:
    """Top ``k`` positive off-diagonal entries per row of ``W^T W``, one item range at a time."""
    from sparse_dot_topn import sp_matmul_topn

    n_items = w.shape[1]
    wt = sp.csr_matrix(w.T, dtype=np.float32)  # items x users
    threads = max(1, len(os.sched_getaffinity(0)))
    lengths = np.zeros(n_items, dtype=np.int64)
    index_parts: list[npt.NDArray[np.int32]] = [np.empty(0, np.int32)]
    score_parts: list[npt.NDArray[np.float32]] = [np.empty(0, np.float32)]
    edges = [*range(0, n_items, max(1, block_items)), n_items]
    blocks = [(a, b) for a, b in itertools.pairwise(edges) if b > a]
    for done, (lo, hi) in enumerate(blocks, 1):
        # k + 1: the item itself is usually among its own best and is dropped below.
        s = sp_matmul_topn(wt[lo:hi], w, top_n=k + 1, threshold=0.0, n_threads=threads)
        rows = np.repeat(np.arange(hi - lo, dtype=np.int64), np.diff(s.indptr))
        keep = s.indices != rows + lo
        part = top_k_per_row(rows[keep], s.indices[keep], s.data[keep], hi - lo, k)
        del s, rows, keep
        lengths[lo:hi] = np.diff(part.indptr)
        index_parts.append(part.indices)
        score_parts.append(part.scores)
        if progress is not None:
            progress(done / len(blocks))
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return CSR(indptr, np.concatenate(index_parts), np.concatenate(score_parts))
