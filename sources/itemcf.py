"""Item-item collaborative filtering with ``implicit``: items liked by the same users.

Build: a user x item matrix of summed event weights, fitted with implicit's cosine, BM25 or
TF-IDF nearest-neighbour model; its item-item similarity is exported to the same CSR format as
co-visitation and served by the same aggregation (``sources.neighbours``).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from pydantic import Field
from threadpoolctl import threadpool_limits

from retrieval.artifacts import CSR, save_csr
from retrieval.events import DEFAULT_EVENT_WEIGHTS, EventLog, event_weight_vector
from sources.base import Need, SourceParams
from sources.neighbours import NeighbourSource, top_k_per_row

__all__ = [
    "ItemCFParams",
    "ItemCFSource",
    "recent_items_mask",
    "similarity_to_csr",
    "user_item_matrix",
]


_BLOCKWISE_ITEMS = 2_000_000


class ItemCFParams(SourceParams):
    model: Literal["cosine", "bm25", "tfidf"] = "cosine"
    neighbours: int = Field(100, ge=1, le=10_000)
    bm25_k1: float = Field(1.2, gt=0)
    bm25_b: float = Field(0.75, ge=0, le=1)
    event_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    history: int = Field(20, ge=1, le=10_000)
    recency_decay: float = Field(0.9, gt=0, le=1)
    # Heavy users (crawlers, shared accounts) add n^2 item pairs each and mostly noise: only
    # each user's most recently touched items count. None: every item of every user.
    max_user_items: int | None = Field(500, ge=2)
    backend: Literal["local", "redis"] = "local"  # redis: rows pushed by `retrieval push`
    # None: block-wise (sources.itemcf_blocks) above 2M items, where implicit's one-piece fit
    # needs tens of GB; the neighbours are the same either way, so it is not a build param.
    blockwise: bool | None = None

    serving_params = frozenset({"history", "recency_decay", "backend", "blockwise"})


def user_item_matrix(
    events: EventLog, event_weights: dict[str, float], max_user_items: int | None = None
) -> sp.csr_matrix:
    """Users x items, each cell the summed weight of that user's events on that item (only
    the ``max_user_items`` most recently touched items of each user)."""
    if max_user_items is not None:
        events = events.subset(recent_items_mask(events, max_user_items))
    w = event_weight_vector(events, event_weights).astype(np.float32)
    m = sp.csr_matrix(
        (w, (events.users, events.items)),
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


def _fit_similarity(matrix: sp.csr_matrix, params: ItemCFParams) -> sp.csr_matrix:
    from implicit.nearest_neighbours import (
        BM25Recommender,
        CosineRecommender,
        TFIDFRecommender,
    )

    k = params.neighbours + 1  # implicit keeps the item itself among its neighbours
    if params.model == "cosine":
        model: Any = CosineRecommender(K=k)
    elif params.model == "bm25":
        model = BM25Recommender(K=k, K1=params.bm25_k1, B=params.bm25_b)
    else:
        model = TFIDFRecommender(K=k)
    # BLAS threads on top of implicit's own are the classic oversubscription trap.
    with threadpool_limits(1, "blas"), warnings.catch_warnings():
        # implicit's own normalize() hands its fit a COO matrix and then warns about it.
        warnings.filterwarnings("ignore", message="Method expects CSR input")
        model.fit(matrix, show_progress=False)
    return sp.csr_matrix(model.similarity)


def similarity_to_csr(sim: sp.csr_matrix, k: int, block_nnz: int = 1 << 22) -> CSR:
    """Each row's ``k`` best positive off-diagonal similarities, in our CSR format.

    Row block by row block, so the sort's temporaries stay ~100 MB whatever the catalog size
    (one pass over 45M similarities used to add 2 GB to the build's peak).
    """
    sim = sp.csr_matrix(sim)
    sim.sort_indices()  # column order within rows: equal scores then rank by smaller id
    n = sim.shape[0]
    indptr = np.asarray(sim.indptr, dtype=np.int64)
    cuts = np.searchsorted(indptr, np.arange(0, indptr[-1], block_nnz), side="right") - 1
    bounds = np.unique(np.r_[cuts, n]).tolist()
    lengths = np.zeros(n, dtype=np.int64)
    index_parts, score_parts = [], []
    for lo, hi in itertools.pairwise(bounds):
        a, b = int(indptr[lo]), int(indptr[hi])
        rows = np.repeat(np.arange(hi - lo, dtype=np.int64), np.diff(indptr[lo : hi + 1]))
        cols, vals = sim.indices[a:b], sim.data[a:b]
        keep = (cols != rows + lo) & (vals > 0)
        part = top_k_per_row(rows[keep], cols[keep], vals[keep], hi - lo, k)
        lengths[lo:hi] = np.diff(part.indptr)
        index_parts.append(part.indices)
        score_parts.append(part.scores)
    out_indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_indptr[1:])
    return CSR(
        indptr=out_indptr,
        indices=np.concatenate([np.empty(0, np.int32), *index_parts]),
        scores=np.concatenate([np.empty(0, np.float32), *score_parts]),
    )


class ItemCFSource(NeighbourSource):
    kind = "itemcf"
    Params = ItemCFParams
    needs = frozenset({Need.HISTORY})

    @classmethod
    def build(
        cls,
        events: EventLog,
        out_dir: Path,
        params: SourceParams,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        assert isinstance(params, ItemCFParams)
        matrix = user_item_matrix(events, params.event_weights, params.max_user_items)
        if progress is not None:
            progress(len(events) // 2)
        blockwise = params.blockwise
        if blockwise is None:
            blockwise = matrix.shape[1] > _BLOCKWISE_ITEMS
        if blockwise:
            from sources.itemcf_blocks import blockwise_similarity, weighted_matrix

            w = weighted_matrix(matrix, params.model, params.bm25_k1, params.bm25_b)
            half = len(events) // 2

            def blocks_done(fraction: float) -> None:
                if progress is not None:
                    progress(half + int(fraction * half))

            csr = blockwise_similarity(w, params.neighbours, progress=blocks_done)
        else:
            csr = similarity_to_csr(_fit_similarity(matrix, params), params.neighbours)
        save_csr(out_dir, csr)
        return {
            "blockwise": blockwise,
            "model": params.model,
            "users": int(matrix.shape[0]),
            "interactions": int(matrix.nnz),
            "nnz": csr.nnz,
        }
