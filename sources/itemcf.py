"""Item-item collaborative filtering: items liked by the same users.

Build: a user x item matrix of summed event weights (each user's most recent items only),
weighted as implicit's cosine, BM25 or TF-IDF nearest-neighbour model weights it; the item-item
similarity ``W^T W`` is computed one item range at a time by sparse_dot_topn, which keeps only
each row's top k while it multiplies (C++, every core). implicit's own fit holds the whole
catalogue's neighbours as 16-byte COO entries before converting them (4.8M items x 101: ~8 GB,
on top of the decoded log); this bounds memory by the block, takes as long
(benchmarks/itemcf_vs_implicit.py; figures in benchmarks/README.md) and gives the same
neighbours (tests/test_itemcf.py checks them against implicit's). The rows are stored in the
co-visitation CSR format and served by the same aggregation (``sources.neighbours``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from pydantic import Field

from retrieval.artifacts import CSR, save_csr
from retrieval.types import DEFAULT_EVENT_WEIGHTS, event_weight_vector
from sources.base import Need, SourceParams, register
from sources.neighbours import NeighbourParams, NeighbourSource, concat_releasing, top_k_csr

if TYPE_CHECKING:
    from retrieval.offline.events import EventLog

__all__ = [
    "ItemCFParams",
    "ItemCFSource",
    "blockwise_similarity",
    "recent_items_mask",
    "user_item_matrix",
    "weighted_matrix",
]


class ItemCFParams(NeighbourParams):
    """Items liked by the same users. The build sums each user's event weights per item into a
    user x item matrix ``W`` (each user's ``max_user_items`` most recent items only), weighs it
    as implicit's cosine, BM25 or TF-IDF nearest-neighbour model does (``model``) and keeps each
    item's ``neighbours`` most similar items by ``W^T W`` without dropping its own entry: the
    self-similarity (1 for cosine) is what brings a re-visited item back, as in implicit.

    Serving is co-visitation's: the neighbour lists of the request's last ``history`` items and
    its seed items, weighted by recency and event type, summed; history items stay candidates,
    seed items are never returned; a second hop (``expand_decay``) when short of k.
    """

    model: Literal["cosine", "bm25", "tfidf"] = Field(
        "cosine",
        description="How the user x item matrix is weighed before `W^T W`, as implicit's model "
        "of the same name: `cosine` (each item's column scaled to unit length), `bm25` (see "
        "`bm25_k1`, `bm25_b`) or `tfidf` (square root of each cell, times an inverse frequency "
        "that weighs users of many items less, then unit length).",
    )
    neighbours: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Most similar items kept per item, best first; the item's own entry (its "
        "self-similarity) competes for a place like any other.",
    )
    bm25_k1: float = Field(
        1.2,
        gt=0,
        description="`bm25` only: saturation of a user's summed weight on an item; the larger, "
        "the longer repeated events keep adding. 1.2 and `bm25_b` 0.75 are the usual BM25 "
        "values, and implicit's `BM25Recommender` defaults.",
    )
    bm25_b: float = Field(
        0.75,
        ge=0,
        le=1,
        description="`bm25` only: how much an item's total weight, relative to the mean item's, "
        "scales its entries down (0: not at all, 1: fully).",
    )
    event_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS),
        description="Weight of each event type (unknown types weigh 1), times the log's weight "
        "column: the matrix's cells, and at serving each history item's weight.",
    )
    max_user_items: int | None = Field(
        500,
        ge=2,
        description="Only each user's this many most recently touched items count: heavy users "
        "(crawlers, shared accounts) add n^2 item pairs each, mostly noise. null: every item of "
        "every user.",
    )

    build_version = 2  # 2: rows keep each item's self-similarity (re-visits come back)


def user_item_matrix(
    events: EventLog, event_weights: dict[str, float], max_user_items: int | None = None
) -> sp.csr_matrix:
    """Users x items, each cell the summed weight of that user's events on that item (only
    the ``max_user_items`` most recently touched items of each user)."""
    w = event_weight_vector(events, event_weights).astype(np.float32)
    users, items = events.users, events.items
    if max_user_items is not None:
        # Only the three columns the matrix reads, not a copy of the whole log.
        keep = recent_items_mask(events, max_user_items)
        if not keep.all():
            w, users, items = w[keep], users[keep], items[keep]
        del keep
    m = sp.csr_matrix(
        (w, (users, items)),
        shape=(len(events.user_ids), len(events.item_ids)),
        dtype=np.float32,
    )
    m.sum_duplicates()
    return m


def recent_items_mask(events: EventLog, cap: int) -> npt.NDArray[np.bool_]:
    """The events on each user's ``cap`` most recently touched distinct items.

    Only users with more than ``cap`` events can exceed ``cap`` items, so the sort below runs on
    their events alone (the log is sorted by user and time: a later index is a later touch).
    """
    users = events.users
    heavy = np.flatnonzero(np.bincount(users, minlength=len(events.user_ids))[users] > cap)
    mask = np.ones(len(events), dtype=bool)
    if heavy.size == 0:
        return mask
    key = (users[heavy].astype(np.int64) << 32) | events.items[heavy]
    # Latest touch of each (user, item): its first occurrence in the reversed events.
    uniq, first_rev = np.unique(key[::-1], return_index=True)
    last_touch = heavy.size - 1 - first_rev
    owner = uniq >> 32
    order = np.lexsort((-last_touch, owner))  # per user, latest touch first
    counts = np.bincount(owner[order] - owner.min())
    counts = counts[counts > 0]
    rank = np.arange(order.size) - np.repeat(np.cumsum(counts) - counts, counts)
    kept = np.sort(uniq[order[rank < cap]])
    mask[heavy] = np.isin(key, kept, assume_unique=False, kind="sort")
    return mask


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
    """Top ``k`` positive entries per row of ``W^T W``, one item range at a time.

    The diagonal stays, as in implicit's models: an item's self-similarity (1 for cosine) is
    what lets it come back as a candidate when it is in the history (a re-visit).
    """
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
        s = sp_matmul_topn(wt[lo:hi], w, top_n=k, threshold=0.0, n_threads=threads)
        part = top_k_csr(s.indptr, s.indices, s.data, k)
        del s
        lengths[lo:hi] = np.diff(part.indptr)
        index_parts.append(part.indices)
        score_parts.append(part.scores)
        if progress is not None:
            progress(done / len(blocks))
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    return CSR(
        indptr,
        concat_releasing(index_parts, np.int32),
        concat_releasing(score_parts, np.float32),
    )


@register("itemcf")
class ItemCFSource(NeighbourSource[ItemCFParams]):
    """Items whose user columns are most like the history's items (cosine, BM25 or TF-IDF)."""

    Params = ItemCFParams
    reads = frozenset({"event_type", "weight"})
    needs = frozenset({Need.HISTORY})

    @classmethod
    def build(
        cls,
        events: EventLog,
        out_dir: Path,
        params: SourceParams,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Write the neighbour CSR under ``out_dir``; the counts go into the manifest."""
        assert isinstance(params, ItemCFParams)
        matrix = user_item_matrix(events, params.event_weights, params.max_user_items)
        if progress is not None:
            progress(len(events) // 2)
        w = weighted_matrix(matrix, params.model, params.bm25_k1, params.bm25_b)
        users, interactions = int(matrix.shape[0]), int(matrix.nnz)
        del matrix  # W is a weighted copy: the raw counts need not sit beside the product
        half = len(events) // 2

        def blocks_done(fraction: float) -> None:
            if progress is not None:
                progress(half + int(fraction * half))

        csr = blockwise_similarity(w, params.neighbours, progress=blocks_done)
        save_csr(out_dir, csr)
        return {
            "model": params.model,
            "users": users,
            "interactions": interactions,
            "nnz": csr.nnz,
        }
