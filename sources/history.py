"""Weighting a user's recent history, and the two kernels every source and the merge share.

``IdGroups`` / ``sum_by_id`` is the one "scores of repeated ids add up" kernel (history weights,
neighbour sums, popularity counts and live counts, the blend's merge); ``top_k_order`` the one
"k best by score, ties to the smaller id" selection after it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval import kernels
from retrieval.ids import lookup_ids
from retrieval.types import Request

__all__ = ["DENSE_IDS_LIMIT", "IdGroups", "sum_by_id", "top_k_order", "weighted_history"]

DENSE_IDS_LIMIT = 1 << 25
"""Below this many possible ids, ``IdGroups(ids, n_ids=...)`` counts instead of sorting: a
bincount of this many float64 slots is 256 MB."""


class IdGroups:
    """The distinct values of an id array and each element's group: the one sum-by-id kernel.

    ``IdGroups(ids)`` sorts once, with numpy's default (unstable) argsort: the order among equal
    ids changes neither the groups nor the sums, and on the blend's hot path (4,000 int64 ids) the
    stable sort cost several times as much. ``IdGroups(ids, n_ids=n)`` is for integers known to
    lie in ``[0, n)``: when ``n`` is small next to the number of ids (at most
    ``max(DENSE_IDS_LIMIT, 4 x len(ids))``) it counts them in a dense bincount, no sort.

    ``ids``: the distinct ids, ascending. ``sum(weights)``: each one's float64 sum of its
    elements' weights, added in input order (``np.bincount``) on either path, so both give the
    same bits. ``inverse``: the position in ``ids`` of every input element.
    """

    __slots__ = ("_dense", "_inverse", "_keys", "ids")

    def __init__(self, ids: npt.ArrayLike, n_ids: int | None = None) -> None:
        keys = np.asarray(ids).reshape(-1)
        self._keys = keys
        self._inverse: npt.NDArray[np.intp] | None = None
        self._dense = 0
        if n_ids is not None and n_ids <= max(DENSE_IDS_LIMIT, 4 * keys.size):
            self._dense = n_ids
            self.ids: npt.NDArray[Any] = np.flatnonzero(np.bincount(keys, minlength=n_ids))
            return
        order = keys.argsort()
        ordered = keys[order]
        first = np.empty(ordered.size, dtype=bool)
        first[:1] = True
        np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
        inverse = np.empty(ordered.size, dtype=np.intp)
        inverse[order] = np.cumsum(first) - 1
        self.ids = ordered[first]
        self._inverse = inverse

    @property
    def inverse(self) -> npt.NDArray[np.intp]:
        """``ids[inverse]`` is the input (built on first use after counting)."""
        if self._inverse is None:
            lookup = np.zeros(self._dense, dtype=np.intp)
            lookup[self.ids] = np.arange(self.ids.size)
            self._inverse = lookup[self._keys]
        return self._inverse

    def sum(self, weights: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Each distinct id's sum of ``weights`` (one per input element), aligned with ``ids``."""
        if self._dense:
            sums = np.bincount(self._keys, weights=weights, minlength=self._dense)[self.ids]
        else:
            sums = np.bincount(self.inverse, weights=weights, minlength=self.ids.size)
        return sums.astype(np.float64, copy=False)  # bincount of nothing is int64


def sum_by_id(
    ids: npt.ArrayLike, weights: npt.ArrayLike
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """Sorted distinct ``ids`` and each one's float64 sum of ``weights`` (``IdGroups``)."""
    groups = IdGroups(ids)
    return groups.ids, groups.sum(weights)


def top_k_order(
    scores: npt.NDArray[np.floating[Any]], ids: npt.NDArray[Any], k: int
) -> npt.NDArray[np.intp]:
    """Indices of the ``k`` best scores, best first, ties broken by the smaller id.

    A partition first, so only the ``k`` survivors (and whatever ties the k-th) are sorted.
    """
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    if scores.size > k:
        cut = np.argpartition(-scores, k - 1)[:k]
        # Everything tied with the k-th score competes on id, not on partition luck.
        cut = np.flatnonzero(scores >= scores[cut].min())
    else:
        cut = np.arange(scores.size)
    return cut[np.lexsort((ids[cut], -scores[cut]))][:k]


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
    if not request.seed_items and not n:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    if not request.seed_items and request.history_ids.dtype == np.int64:
        uniq, summed = kernels.sum_unique(request.history_ids[len(request.history) - n :], weights)
        return uniq, summed.astype(np.float32)
    ids: list[Any] = list(request.seed_items) + list(hist)
    all_w = np.concatenate([np.ones(len(request.seed_items)), weights])
    uniq, summed = sum_by_id(lookup_ids(ids, "request.history"), all_w)
    return uniq, summed.astype(np.float32)
