"""Weighting a user's recent history: shared by every source that reads it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.ids import lookup_ids
from retrieval.types import Request

__all__ = ["weighted_history"]


def weighted_history(
    request: Request,
    max_items: int,
    recency_decay: float = 0.9,
    event_weights: Mapping[str, float] | None = None,
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32]]:
    """The last ``max_items`` history items (seed items first) and a weight for each.

    The most recent item weighs 1, each older one ``recency_decay`` times less, times its event
    type's weight (unknown types weigh 1). Seed items ("more like this") weigh as much as the most
    recent item. Repeated items keep the sum of their weights, so ids come back unique.
    """
    hist = request.history[-max_items:] if max_items > 0 else ()
    n = len(hist)
    weights = recency_decay ** np.arange(n - 1, -1, -1, dtype=np.float64)
    if event_weights and request.history_event_types is not None and n:
        types = request.history_event_types[-n:]
        weights = weights * np.fromiter(
            (event_weights.get(t, 1.0) for t in types), dtype=np.float64, count=n
        )
    ids: list[Any] = list(request.seed_items) + list(hist)
    if not ids:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    all_w = np.concatenate([np.ones(len(request.seed_items)), weights])
    arr = lookup_ids(ids, "request.history")
    uniq, inverse = np.unique(arr, return_inverse=True)
    summed = np.bincount(inverse.ravel(), weights=all_w, minlength=len(uniq))
    return uniq, summed.astype(np.float32)
