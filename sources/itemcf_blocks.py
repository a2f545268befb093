"""Item-CF similarity block by block, for catalogues where implicit's one-piece fit cannot fit.

implicit's item-item models compute ``sim = W^T W`` (W: the weighted user x item matrix) in one
piece: +3 GB at 1M items / 22M interactions, ~20x that for 10x the data (issue 6). Here a range
of items (rows of ``W^T``) is multiplied with the whole ``W`` by scipy, cut to its top ``k`` and
kept as CSR before the next range starts: memory is bounded by the block (``budget``
multiply-adds), not by the catalogue. Same weighting functions as implicit, so the neighbours are
the same (tests/test_itemcf.py compares them).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from retrieval.artifacts import CSR
from sources.neighbours import top_k_per_row

__all__ = ["BLOCK_FLOPS", "blockwise_similarity", "weighted_matrix"]

BLOCK_FLOPS = 60_000_000  # multiply-adds per block: the block product stays ~1 GB at peak


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


def _blocks(w: sp.csr_matrix, wt: sp.csr_matrix, budget: int) -> list[tuple[int, int]]:
    """Item ranges whose product with ``w`` costs about ``budget`` multiply-adds each."""
    per_user = np.diff(w.indptr).astype(np.int64)  # items of each user
    per_entry = np.r_[0, np.cumsum(per_user[wt.indices])]  # cost up to each entry of W^T
    cum = per_entry[wt.indptr]  # cost of items [0, i)
    n = wt.shape[0]
    cuts = np.searchsorted(cum, np.arange(budget, int(cum[-1]), budget), side="left")
    edges = np.unique(np.r_[0, cuts, n])
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges.tolist()) if b > a]


def blockwise_similarity(
    w: sp.csr_matrix,
    k: int,
    budget: int = BLOCK_FLOPS,
    progress: Callable[[float], None] | None = None,
) -> CSR:
    """Top ``k`` positive off-diagonal entries per row of ``W^T W``, one item range at a time."""
    n_items = w.shape[1]
    wt = sp.csr_matrix(w.T, dtype=np.float32)  # items x users
    lengths = np.zeros(n_items, dtype=np.int64)
    index_parts: list[npt.NDArray[np.int32]] = [np.empty(0, np.int32)]
    score_parts: list[npt.NDArray[np.float32]] = [np.empty(0, np.float32)]
    blocks = _blocks(w, wt, budget)
    for done, (lo, hi) in enumerate(blocks, 1):
        s = sp.csr_matrix(wt[lo:hi] @ w)
        s.sort_indices()  # column order within rows: equal scores then rank by smaller id
        rows = np.repeat(np.arange(hi - lo, dtype=np.int64), np.diff(s.indptr))
        keep = (s.indices != rows + lo) & (s.data > 0)
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
