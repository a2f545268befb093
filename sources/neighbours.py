"""The one helper behind co-visitation and item-CF: sum the neighbour lists of recent items.

Both sources store, per item, its top neighbours as a CSR row. A user's candidates are the
neighbours of their recent items, each weighted by how recent/strong that history item is. The
sum is sparse (concatenate the rows, sum duplicates): no dense catalog-sized vector per request,
which at 10M items would cost 40 MB and milliseconds of memset alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.artifacts import CSR, ArtifactError, IdMap, load_csr
from retrieval.types import Deadline, Request
from sources.base import Ranked, Source, SourceContext, SourceParams
from sources.history import weighted_history

__all__ = ["NeighbourSource", "aggregate", "top_k_per_row"]

# Below this many ms left, read only the few most important history items.
_HURRY_MS = 2.0
_HURRY_ITEMS = 5


def aggregate(
    csr: CSR,
    rows: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
    k: int,
    deadline: Deadline | None = None,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Top ``k`` of ``sum_h weights[h] * csr[rows[h]]``, excluding ``rows`` themselves.

    Ties are broken by the smaller dense id so the answer does not depend on array order.
    """
    keep = rows >= 0
    rows, weights = rows[keep], weights[keep]
    if rows.size == 0 or k <= 0:
        return np.empty(0, np.int32), np.empty(0, np.float32)
    if deadline is not None and rows.size > _HURRY_ITEMS and deadline.remaining_ms() < _HURRY_MS:
        best = np.argsort(-weights, kind="stable")[:_HURRY_ITEMS]
        rows, weights = rows[best], weights[best]
    starts = csr.indptr[rows]
    lengths = csr.indptr[rows + 1] - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, np.int32), np.empty(0, np.float32)
    # Positions of every neighbour of every row, without a Python loop over rows.
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
    cand = np.asarray(csr.indices[offsets])
    score = np.asarray(csr.scores[offsets], dtype=np.float64) * np.repeat(weights, lengths)
    order = np.argsort(cand, kind="stable")
    cand, score = cand[order], score[order]
    first = np.empty(cand.size, dtype=bool)
    first[0] = True
    np.not_equal(cand[1:], cand[:-1], out=first[1:])
    uniq = cand[first]
    summed = np.add.reduceat(score, np.flatnonzero(first))
    mask = ~np.isin(uniq, rows)
    uniq, summed = uniq[mask], summed[mask]
    if uniq.size > k:
        cut = np.argpartition(-summed, k - 1)[:k]
        kth = summed[cut].min()
        cut = np.flatnonzero(summed >= kth)
        uniq, summed = uniq[cut], summed[cut]
    order = np.lexsort((uniq, -summed))[:k]
    return uniq[order].astype(np.int32), summed[order].astype(np.float32)


def top_k_per_row(
    rows: npt.NDArray[np.int64],
    cols: npt.NDArray[np.int64],
    vals: npt.NDArray[np.float64],
    n_rows: int,
    k: int,
) -> CSR:
    """A CSR keeping each row's ``k`` largest values, sorted descending (ties: smaller column)."""
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.cumsum(counts) - counts
    rank = np.arange(rows.size) - np.repeat(starts, counts)
    keep = rank < k
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return CSR(indptr=indptr, indices=cols.astype(np.int32), scores=vals.astype(np.float32))


class NeighbourSource(Source):
    """Serves a CSR neighbour list built offline: the shared retrieval side of covisit/itemcf."""

    def __init__(self, name: str, params: SourceParams, context: SourceContext) -> None:
        super().__init__(name, params, context)
        if context.artifacts is None:
            raise ArtifactError(f"source {name!r} needs built artifacts; run `retrieval build`")
        root = Path(context.artifacts)
        self.csr = load_csr(root / name)
        self.items = IdMap.load(root / "ids" / "items.npy")
        if self.csr.n_rows != len(self.items):
            raise ArtifactError(
                f"{root / name}: {self.csr.n_rows} rows but the id map has {len(self.items)} "
                "items; the build is inconsistent, rebuild it"
            )
        self._history: int = int(getattr(params, "history", 20))
        self._decay: float = float(getattr(params, "recency_decay", 0.9))
        self._event_weights: Mapping[str, float] | None = getattr(params, "event_weights", None)

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        ids, weights = weighted_history(request, self._history, self._decay, self._event_weights)
        if ids.size == 0:
            return _empty()
        dense = self.items.to_dense(ids)
        cand, scores = aggregate(self.csr, dense, weights, k, deadline)
        if cand.size == 0:
            return _empty()
        # Never hand back the history itself (seed items included): that is `recent`'s job.
        return np.asarray(self.items.to_external(cand)), scores


def _empty() -> tuple[npt.NDArray[Any], npt.NDArray[np.float32]]:
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
