"""The one helper behind co-visitation and item-CF: sum the neighbour lists of recent items.

Both sources store, per item, its top neighbours as a CSR row. A user's candidates are the
neighbours of their recent items, each weighted by how recent/strong that history item is. The
sum is sparse (concatenate the rows, sum duplicates): no dense catalog-sized vector per request,
which at 10M items would cost 40 MB and milliseconds of memset alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from retrieval.artifacts import CSR, ArtifactError, IdMap, load_csr
from retrieval.rows import Row
from retrieval.types import Deadline, Request
from sources.base import Ranked, Source, SourceContext, SourceParams
from sources.history import weighted_history

__all__ = ["NeighbourSource", "RowReader", "aggregate", "top_k_per_row"]

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
    row_ids: npt.ArrayLike,
    col_ids: npt.ArrayLike,
    values: npt.ArrayLike,
    n_rows: int,
    k: int,
) -> CSR:
    """A CSR keeping each row's ``k`` largest values, sorted descending (ties: smaller column).

    One stable sort of a packed ``(row, descending float32 score)`` key instead of a three-key
    lexsort, which took 45 s on item-CF's 45M similarities. Both builders pass entries already in
    (row, column) order, so the pre-sort that sends ties to the smaller column is then skipped.
    """
    rows = np.asarray(row_ids, dtype=np.int64)
    cols = np.asarray(col_ids)
    vals = np.asarray(values, dtype=np.float32)  # ranked as stored, so stored ties stay by column
    by_col = (rows << 32) | cols.astype(np.int64)
    if by_col.size > 1 and bool(np.any(by_col[1:] < by_col[:-1])):
        order = np.argsort(by_col, kind="stable")
        rows, cols, vals = rows[order], cols[order], vals[order]
    del by_col
    order = np.argsort(_descending_key(rows, vals), kind="stable")
    rows, cols, vals = rows[order], cols[order], vals[order]
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.cumsum(counts) - counts
    rank = np.arange(rows.size) - np.repeat(starts, counts)
    keep = rank < k
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return CSR(indptr=indptr, indices=cols.astype(np.int32), scores=vals)


def _descending_key(
    rows: npt.NDArray[np.int64], vals: npt.NDArray[np.float32]
) -> npt.NDArray[np.uint64]:
    """``row << 32 | rank`` where ``rank`` grows as the score falls: one int sorts both."""
    bits = vals.view(np.uint32)
    # IEEE floats order like their bits once negatives are flipped and positives get the top bit.
    ascending = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x8000_0000))
    return (rows.astype(np.uint64) << np.uint64(32)) | (~ascending).astype(np.uint64)


@runtime_checkable
class RowReader(Protocol):
    """A store that serves rows pushed by ``retrieval push`` (the Redis store)."""

    def neighbour_rows(
        self, source: str, items: Sequence[str], *, timeout_ms: float | None = None
    ) -> list[Row | None] | None: ...


class NeighbourSource(Source):
    """Serves a CSR neighbour list built offline: the shared retrieval side of covisit/itemcf.

    With ``backend: redis`` the rows come from the store instead (pushed there by ``retrieval
    push``), for hosts with no local artifacts: one round trip per request for the history
    items' rows, bounded by the time left; a failed read returns nothing (the store reports
    itself degraded), never raises.
    """

    def __init__(self, name: str, params: SourceParams, context: SourceContext) -> None:
        super().__init__(name, params, context)
        self._history: int = int(getattr(params, "history", 20))
        self._decay: float = float(getattr(params, "recency_decay", 0.9))
        self._event_weights: Mapping[str, float] | None = getattr(params, "event_weights", None)
        self._rows: RowReader | None = None
        if getattr(params, "backend", "local") == "redis":
            if not isinstance(context.store, RowReader):
                raise ArtifactError(
                    f"source {name!r} has backend: redis, which needs store.kind: redis"
                )
            self._rows = context.store
            return
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

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        ids, weights = weighted_history(request, self._history, self._decay, self._event_weights)
        if ids.size == 0:
            return _empty()
        if self._rows is not None:
            return self._retrieve_remote(self._rows, ids, weights, k, deadline)
        dense = self.items.to_dense(ids)
        cand, scores = aggregate(self.csr, dense, weights, k, deadline)
        if cand.size == 0:
            return _empty()
        # Never hand back the history itself (seed items included): that is `recent`'s job.
        return np.asarray(self.items.to_external(cand)), scores

    def _retrieve_remote(
        self,
        reader: RowReader,
        ids: npt.NDArray[Any],
        weights: npt.NDArray[np.float32],
        k: int,
        deadline: Deadline,
    ) -> Ranked:
        """``aggregate`` over pushed rows: same sums, same order (external ids sort as dense)."""
        if ids.size > _HURRY_ITEMS and deadline.remaining_ms() < _HURRY_MS:
            best = np.argsort(-weights, kind="stable")[:_HURRY_ITEMS]
            ids, weights = ids[best], weights[best]
        keys = [str(x) for x in ids.tolist()]
        rows = reader.neighbour_rows(self.name, keys, timeout_ms=deadline.remaining_ms())
        got = [(r, float(w)) for r, w in zip(rows or (), weights.tolist(), strict=False) if r]
        got = [(r, w) for r, w in got if r[0].size]
        if not got:
            return _empty()
        kinds = {r[0].dtype.kind for r, _ in got}
        if len(kinds) > 1:  # int and str rows in one version: a foreign push, not ours
            return _empty()
        cand = np.concatenate([r[0] for r, _ in got])
        score = np.concatenate(
            [r[1].astype(np.float64) * w for r, w in got]  # as aggregate: float64 sums
        )
        uniq, inverse = np.unique(cand, return_inverse=True)
        summed = np.bincount(inverse.ravel(), weights=score, minlength=uniq.size)
        mask = ~np.isin(uniq.astype(str), np.asarray(keys, dtype=str))
        uniq, summed = uniq[mask], summed[mask]
        order = np.lexsort((uniq, -summed))[:k]
        return uniq[order], summed[order].astype(np.float32)


def _empty() -> tuple[npt.NDArray[Any], npt.NDArray[np.float32]]:
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
