"""Item-item collaborative filtering with ``implicit``: items liked by the same users.

Build: a user x item matrix of summed event weights, fitted with implicit's cosine, BM25 or
TF-IDF nearest-neighbour model; its item-item similarity is exported to the same CSR format as
co-visitation and served by the same aggregation (``sources.neighbours``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from pydantic import Field
from threadpoolctl import threadpool_limits

from retrieval.artifacts import save_csr
from retrieval.events import EventLog
from sources.base import Need, SourceParams
from sources.covisitation import DEFAULT_EVENT_WEIGHTS, event_weight_vector
from sources.neighbours import NeighbourSource, top_k_per_row

__all__ = ["ItemCFParams", "ItemCFSource", "user_item_matrix"]


class ItemCFParams(SourceParams):
    model: Literal["cosine", "bm25", "tfidf"] = "cosine"
    neighbours: int = Field(100, ge=1, le=10_000)
    bm25_k1: float = Field(1.2, gt=0)
    bm25_b: float = Field(0.75, ge=0, le=1)
    event_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    history: int = Field(20, ge=1, le=10_000)
    recency_decay: float = Field(0.9, gt=0, le=1)

    serving_params = frozenset({"history", "recency_decay"})


def user_item_matrix(events: EventLog, event_weights: dict[str, float]) -> sp.csr_matrix:
    """Users x items, each cell the summed weight of that user's events on that item."""
    w = event_weight_vector(events, event_weights).astype(np.float32)
    m = sp.csr_matrix(
        (w, (events.users, events.items)),
        shape=(len(events.user_ids), len(events.item_ids)),
        dtype=np.float32,
    )
    m.sum_duplicates()
    return m


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
        matrix = user_item_matrix(events, params.event_weights)
        if progress is not None:
            progress(len(events) // 2)
        sim = _fit_similarity(matrix, params).tocoo()
        off_diagonal = (sim.row != sim.col) & (sim.data > 0)
        csr = top_k_per_row(
            sim.row[off_diagonal].astype(np.int64),
            sim.col[off_diagonal].astype(np.int64),
            sim.data[off_diagonal].astype(np.float64),
            matrix.shape[1],
            params.neighbours,
        )
        save_csr(out_dir, csr)
        return {
            "model": params.model,
            "users": int(matrix.shape[0]),
            "interactions": int(matrix.nnz),
            "nnz": csr.nnz,
        }
