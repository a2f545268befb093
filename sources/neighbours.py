"""The one helper behind co-visitation and item-CF: sum the neighbour lists of recent items.

Both sources store, per item, its top neighbours as a CSR row. A user's candidates are the
neighbours of their recent items, each weighted by how recent/strong that history item is. The
sum is sparse (concatenate the rows, sum duplicates): no dense catalog-sized vector per request,
which at 10M items would cost 40 MB and milliseconds of memset alone.

History items stay candidates, scored like any other: re-visits are a large share of next items
in session commerce, and the blend's ``exclude_seen`` is the one place that drops seen items. When
the history's neighbours are fewer than ``k`` (a short session has a small neighbourhood), a
second hop reads the rows of the best first-hop candidates and ranks their new neighbours below
every first-hop one, so ``k`` never reorders the first-hop candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt
from pydantic import Field

from retrieval import kernels
from retrieval.artifacts import CSR, ArtifactError, IdMap, load_csr, source_root
from retrieval.errors import StoreError
from retrieval.ids import lookup_ids
from retrieval.store.rows import Row
from retrieval.types import Deadline, Request
from sources.base import Ranked, Source, SourceContext, SourceParams
from sources.history import sum_by_id, top_k_order, weighted_history

__all__ = [
    "Gathered",
    "NeighbourParams",
    "NeighbourSource",
    "RowReader",
    "aggregate",
    "aggregate_numpy",
    "concat_releasing",
    "first_hop",
    "gather_csr",
    "neighbourhood",
    "top_k_csr",
    "top_k_per_row",
    "top_k_per_row_numpy",
]

# Below this many ms left, read only the few most important history items.
_HURRY_MS = 2.0
_HURRY_ITEMS = 5
# Below this many ms left, skip the second hop (a few times what it costs at k = 1000 on
# DIGINETICA: benchmarks/README.md).
_EXPAND_MS = 5.0
# The second hop reads enough rows for this many neighbours per missing candidate: rows of
# related items overlap, so fewer left k unfilled on DIGINETICA (benchmarks/README.md).
_EXPAND_READ = 8
_NO_IDS = np.empty(0, dtype=np.int32)

Gathered = tuple[npt.NDArray[Any], npt.NDArray[np.float64], npt.NDArray[np.int64]]
"""Rows read for some items: every neighbour id and score, concatenated, and each row's length."""

Fetch = Callable[[npt.NDArray[Any]], Gathered | None]
"""Reads the rows of some items (None: could not, so the second hop is skipped)."""


def gather_csr(csr: CSR, rows: npt.NDArray[np.int32]) -> Gathered:
    """The rows ``rows`` of ``csr`` concatenated, without a Python loop over rows."""
    starts = csr.indptr[rows]
    lengths = (csr.indptr[rows + 1] - starts).astype(np.int64)
    total = int(lengths.sum())
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(total)
    return (
        np.asarray(csr.indices[offsets]),
        np.asarray(csr.scores[offsets], dtype=np.float64),  # float64 sums, local and remote
        lengths,
    )


def aggregate(
    csr: CSR,
    rows: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
    k: int,
    deadline: Deadline | None = None,
    *,
    drop: npt.NDArray[np.int32] | None = None,
    self_weight: float = 0.0,
    expand_decay: float = 0.0,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Top ``k`` of ``sum_h weights[h] * csr[rows[h]]`` over dense ids (see ``neighbourhood``),
    in the compiled kernels (``retrieval.kernels``): the same answer as ``aggregate_numpy``,
    bit for bit, without holding the GIL.

    Ties are broken by the smaller dense id so the answer does not depend on array order.
    """
    keep = rows >= 0
    rows, weights = _hurried(rows[keep], weights[keep], deadline)
    if rows.size == 0 or k <= 0:
        return np.empty(0, np.int32), np.empty(0, np.float32)
    rows = rows.astype(np.int32, copy=False)
    weights = weights.astype(np.float32, copy=False)
    banned = _NO_IDS if drop is None else np.sort(drop[drop >= 0]).astype(np.int32, copy=False)
    best, scores = kernels.first_hop(
        csr.indptr, csr.indices, csr.scores, rows, weights, self_weight, banned, k
    )
    short = 0 < best.size < k and expand_decay > 0
    if short and (deadline is None or deadline.remaining_ms() >= _EXPAND_MS):
        return kernels.second_hop(
            csr.indptr, csr.indices, csr.scores, best, scores, rows, banned, k, expand_decay,
            _EXPAND_READ,
        )  # fmt: skip
    return best, scores.astype(np.float32)


def aggregate_numpy(
    csr: CSR,
    rows: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
    k: int,
    deadline: Deadline | None = None,
    *,
    drop: npt.NDArray[np.int32] | None = None,
    self_weight: float = 0.0,
    expand_decay: float = 0.0,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """``aggregate`` in numpy: the reference the compiled kernels are tested against (and the
    same steps ``neighbourhood`` runs over pushed rows)."""
    keep = rows >= 0
    rows, weights = _hurried(rows[keep], weights[keep], deadline)
    if rows.size == 0 or k <= 0:
        return np.empty(0, np.int32), np.empty(0, np.float32)
    ids, scores = neighbourhood(
        gather_csr(csr, rows),
        rows,
        weights,
        k,
        lambda seeds: gather_csr(csr, seeds),
        deadline=deadline,
        drop=None if drop is None else drop[drop >= 0],
        self_weight=self_weight,
        expand_decay=expand_decay,
    )
    return ids.astype(np.int32), scores


def neighbourhood(
    first: Gathered,
    items: npt.NDArray[Any],
    weights: npt.NDArray[np.float32],
    k: int,
    fetch: Fetch,
    *,
    deadline: Deadline | None = None,
    drop: npt.NDArray[Any] | None = None,
    self_weight: float = 0.0,
    expand_decay: float = 0.0,
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32]]:
    """The best ``k`` candidates from ``items``' rows (``first``), over any id kind.

    History items are candidates like any other (see ``first_hop``); ``drop`` ids never are.
    When fewer than ``k`` are found, ``expand_decay > 0`` and the deadline allows, ``fetch``
    reads the rows of the best non-history candidates and their new neighbours follow, ranked
    after every first-hop candidate (``_second_hop``).
    """
    best, scores = first_hop(first, items, weights, k, drop, self_weight)
    short = 0 < best.size < k and expand_decay > 0
    if short and (deadline is None or deadline.remaining_ms() >= _EXPAND_MS):
        return _second_hop(fetch, best, scores, items, first[2], drop, k, expand_decay)
    return best, scores.astype(np.float32)


def first_hop(
    rows: Gathered,
    items: npt.NDArray[Any],
    weights: npt.NDArray[np.float32],
    k: int,
    drop: npt.NDArray[Any] | None = None,
    self_weight: float = 0.0,
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """Top ``k`` of the weighted sum of ``items``' rows, best first.

    History items score through the other history items' rows, plus ``weight * self_weight *
    (their own row's top score)``: an item is as close to itself as to its best neighbour.
    Item-CF keeps its self-similarity in the row instead, as implicit does.
    """
    ids, raw, lengths = rows
    scores = raw * np.repeat(weights.astype(np.float64), lengths)
    if self_weight > 0:
        own = weights * self_weight * _row_max(raw, lengths)
        has = own > 0
        ids = np.concatenate([ids, items[has]])
        scores = np.concatenate([scores, own[has]])
    uniq, summed = sum_by_id(ids, scores)
    if drop is not None and drop.size and uniq.size:
        keep = ~_isin_sorted(uniq, np.sort(drop))
        uniq, summed = uniq[keep], summed[keep]
    return _top(uniq, summed, k)


def _second_hop(
    fetch: Fetch,
    best: npt.NDArray[Any],
    best_scores: npt.NDArray[np.float64],
    history: npt.NDArray[Any],
    history_lengths: npt.NDArray[np.int64],
    drop: npt.NDArray[Any] | None,
    k: int,
    decay: float,
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32]]:
    """``best`` followed by the neighbours of its top non-history items, scored below it.

    It reads enough rows for ``_EXPAND_READ`` neighbours per missing candidate, at the history
    rows' mean length (rows of related items overlap): the cost follows ``k``, not the
    catalogue, and needs no row lengths up front (a store knows them only once read). Each row
    is scaled to top score 1 and weighted by its item's first-hop score, so the order follows
    first-hop strength, not a row's raw scale (co-visitation counts grow with popularity). The
    best new candidate then scores ``decay`` times the weakest first-hop score, the others in
    proportion: strictly below, so the first hop's order never depends on ``k``.
    """
    floor = float(best_scores[-1])
    out = best, best_scores.astype(np.float32)
    pool = np.flatnonzero(~np.isin(best, history) & (best_scores > 0))
    full = history_lengths[history_lengths > 0]
    if pool.size == 0 or floor <= 0 or full.size == 0:
        return out
    n_rows = math.ceil(_EXPAND_READ * (k - best.size) / float(full.mean()))
    seeds, seed_w = best[pool[:n_rows]], best_scores[pool[:n_rows]]
    got = fetch(seeds)
    if got is None:
        return out
    ids, raw, lengths = got
    top = _row_max(raw, lengths)
    norm = np.divide(seed_w, top, out=np.zeros_like(top), where=top > 0)
    uniq, summed = sum_by_id(ids, raw * np.repeat(norm, lengths))
    # first-hop items (the seeds among them) and dropped ids are not new
    keep = ~_isin_sorted(uniq, np.sort(best))
    if drop is not None and drop.size:
        keep &= ~_isin_sorted(uniq, np.sort(drop))
    new, new_scores = _top(uniq[keep], summed[keep], k - best.size)
    if new.size == 0:
        return out
    scaled = (floor * decay * new_scores / new_scores[0]).astype(np.float32)
    # float32 rounding must not lift the best of them to the floor itself
    np.minimum(scaled, np.nextafter(np.float32(floor), np.float32(0)), out=scaled)
    return np.concatenate([best, new]), np.concatenate([out[1], scaled])


def _top(
    uniq: npt.NDArray[Any], summed: npt.NDArray[np.float64], k: int
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    """The ``k`` best by score then smaller id."""
    order = top_k_order(summed, uniq, k)
    return uniq[order], summed[order]


def _isin_sorted(ids: npt.NDArray[Any], sorted_set: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """``np.isin`` by binary search in a small sorted set: no sort of ``ids``."""
    if sorted_set.size == 0:
        return np.zeros(ids.size, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, ids), sorted_set.size - 1)
    return np.asarray(sorted_set[pos] == ids)


def _row_max(scores: npt.NDArray[np.float64], lengths: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
    """Each row's top score (0 for an empty row)."""
    out = np.zeros(lengths.size, dtype=np.float64)
    full = lengths > 0
    if full.any():
        starts = (np.cumsum(lengths) - lengths)[full]
        out[full] = np.maximum.reduceat(scores, starts)
    return out


def _hurried(
    items: npt.NDArray[Any], weights: npt.NDArray[np.float32], deadline: Deadline | None
) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32]]:
    """Only the heaviest few history items when the deadline is close."""
    if deadline is not None and items.size > _HURRY_ITEMS and deadline.remaining_ms() < _HURRY_MS:
        best = np.argsort(-weights, kind="stable")[:_HURRY_ITEMS]
        return items[best], weights[best]
    return items, weights


def top_k_per_row(
    row_ids: npt.ArrayLike,
    col_ids: npt.ArrayLike,
    values: npt.ArrayLike,
    n_rows: int,
    k: int,
) -> CSR:
    """A CSR keeping each row's ``k`` largest values, sorted descending (ties: smaller column).

    Both builders pass entries grouped by ascending row, with positive scores: each row is then
    sorted on its own by a compiled kernel (``retrieval.build_kernels``) that allocates only
    the output. Anything else goes the numpy way (``top_k_per_row_numpy``): one stable sort of
    a packed ``(row, descending float32 score)`` key, about 46 bytes per entry at once.
    """
    rows = np.asarray(row_ids, dtype=np.int64)
    cols = np.asarray(col_ids)
    vals = np.asarray(values, dtype=np.float32)  # ranked as stored, so stored ties stay by column
    if cols.dtype == np.int32 and k > 0 and not np.signbit(vals).any():
        from retrieval.build_kernels import row_pointers  # builds only
        from retrieval.build_kernels import top_k_csr as kernel

        indptr = row_pointers(rows, n_rows)
        if indptr is not None:
            return CSR(*kernel(indptr, cols, vals, k))
    return top_k_per_row_numpy(rows, cols, vals, n_rows, k)


def top_k_csr(
    indptr: npt.NDArray[np.int64], cols: npt.ArrayLike, values: npt.ArrayLike, k: int
) -> CSR:
    """``top_k_per_row`` for entries already in CSR rows (columns in any order within a row):
    no per-entry row array is made. Compiled (``retrieval.build_kernels``) for positive
    scores."""
    from retrieval.build_kernels import top_k_csr as kernel  # builds only: not at serving

    vals = np.asarray(values, dtype=np.float32)
    ptr = np.asarray(indptr, dtype=np.int64)
    if k <= 0 or np.signbit(vals).any():
        rows = np.repeat(np.arange(ptr.size - 1, dtype=np.int64), np.diff(ptr))
        return top_k_per_row_numpy(rows, cols, vals, ptr.size - 1, k)
    return CSR(*kernel(ptr, np.asarray(cols, dtype=np.int32), vals, k))


def concat_releasing(parts: list[npt.NDArray[Any]], dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """``np.concatenate(parts)`` that empties ``parts`` as it copies them.

    The output's pages are touched only as each part is copied in, and each part is freed right
    after, so the two together never hold much more than one copy: a builder's neighbour lists
    at 10M items are gigabytes, and a plain concatenate held them twice.
    """
    out = np.empty(sum(part.size for part in parts), dtype=dtype)
    at = 0
    parts.reverse()
    while parts:
        part = parts.pop()
        out[at : at + part.size] = part
        at += part.size
        del part
    return out


def top_k_per_row_numpy(
    row_ids: npt.ArrayLike,
    col_ids: npt.ArrayLike,
    values: npt.ArrayLike,
    n_rows: int,
    k: int,
) -> CSR:
    """``top_k_per_row`` in numpy: the reference the compiled kernel is checked against, and
    the path for entries out of (row, column) order."""
    rows = np.asarray(row_ids, dtype=np.int64)
    cols = np.asarray(col_ids)
    vals = np.asarray(values, dtype=np.float32)
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
    """A store that serves rows pushed by ``retrieval push`` (the Redis store).

    ``neighbour_rows`` returns one row (or None) per item and raises ``StoreError`` when it
    cannot read them: Redis failed, or nothing (or no longer anything) was pushed.
    """

    def neighbour_rows(
        self, source: str, items: Sequence[str], *, timeout_ms: float | None = None
    ) -> list[Row | None]:
        """The pushed rows of ``items`` (None where an item has none), read within ``timeout_ms``;
        raises ``StoreError`` when the read fails, so the source reports ``error``."""


class NeighbourParams(SourceParams):
    """The serving knobs co-visitation and item-CF share: how much history to read and how to
    weigh it, the second hop, and where the rows come from. None of them changes a build."""

    history: int = Field(
        20,
        ge=1,
        le=10_000,
        description="Most recent history items whose neighbour lists are summed per request.",
    )

    recency_decay: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Weight of a history item relative to the next newer one (the newest "
        "weighs 1); 1.0: equal weights.",
    )

    expand_decay: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Second hop, when the history's neighbours are fewer than k: the "
        "neighbours of the best first-hop candidates follow every first-hop one, the best at "
        "`expand_decay` x the weakest first-hop score (any value above 0 ranks the same; it "
        "sets the scores). 0 turns the second hop off. Skipped when the deadline is close.",
    )

    backend: Literal["local", "redis"] = Field(
        "local",
        description="`local`: serve the built artifacts; `redis`: serve rows pushed by "
        "`retrieval push` from the store (`store.kind: redis`), for hosts without local "
        "artifacts.",
    )

    serving_params: ClassVar[frozenset[str]] = frozenset(
        {"history", "recency_decay", "expand_decay", "backend"}
    )


NP = TypeVar("NP", bound=NeighbourParams)


class NeighbourSource(Source[NP]):
    """Serves a CSR neighbour list built offline: the shared retrieval side of covisit/itemcf.

    With ``backend: redis`` the rows come from the store instead (pushed there by ``retrieval
    push``), for hosts with no local artifacts: one round trip per request for the history
    items' rows, and a second one for the second hop when the first is short of ``k``, both
    bounded by the time left. A failed first read (Redis down or slow, nothing pushed, or a
    foreign push) raises, so the blend reports this source as an error and its breaker counts
    it; the store reports itself degraded. A failed second read only skips the second hop.
    Answers equal the local ones.

    Generic over the kind's params (``CovisitationParams``, ``ItemCFParams``), both
    ``NeighbourParams``; ``self_weight`` (co-visitation only) is read by name, 0 when absent.
    """

    def __init__(self, name: str, params: NP, context: SourceContext) -> None:
        super().__init__(name, params, context)
        self._history = params.history
        self._decay = params.recency_decay
        self._event_weights: Mapping[str, float] | None = getattr(params, "event_weights", None)
        self._self_weight: float = float(getattr(params, "self_weight", 0.0))
        self._expand = params.expand_decay
        self._rows: RowReader | None = None
        if params.backend == "redis":
            if not isinstance(context.store, RowReader):
                raise ArtifactError(
                    f"source {name!r} has backend: redis, which needs store.kind: redis"
                )
            self._rows = context.store
            return
        if context.artifacts is None:
            raise ArtifactError(f"source {name!r} needs built artifacts; run `retrieval build`")
        # Resolved once and checked (stamp, checksums, id maps) before anything is mapped.
        root = source_root(Path(context.artifacts), name)
        self.csr = load_csr(root / name)
        self.items = IdMap.load(root / "ids" / "items.npy")
        if self.csr.n_rows != len(self.items):
            raise ArtifactError(
                f"{root / name}: {self.csr.n_rows} rows but the id map has {len(self.items)} "
                "items; the build is inconsistent, rebuild it"
            )

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        """The summed neighbour rows of the weighted history (and seeds), seeds never returned; rows
        come from the local CSR or, with ``backend: redis``, from the pushed rows."""
        ids, weights = weighted_history(request, self._history, self._decay, self._event_weights)
        if ids.size == 0:
            return _empty()
        # Seed items ("more like this") are what the caller is showing: never candidates.
        seeds = None
        if request.seed_items:
            seeds = lookup_ids(request.seed_items, "request.seed_items")
        if self._rows is not None:
            return self._retrieve_remote(self._rows, ids, weights, k, deadline, seeds)
        cand, scores = aggregate(
            self.csr,
            self.items.to_dense(ids),
            weights,
            k,
            deadline,
            drop=None if seeds is None else self.items.to_dense(seeds),
            self_weight=self._self_weight,
            expand_decay=self._expand,
        )
        if cand.size == 0:
            return _empty()
        return np.asarray(self.items.to_external(cand)), scores

    def _retrieve_remote(
        self,
        reader: RowReader,
        ids: npt.NDArray[Any],
        weights: npt.NDArray[np.float32],
        k: int,
        deadline: Deadline,
        seeds: npt.NDArray[Any] | None,
    ) -> Ranked:
        """``neighbourhood`` over pushed rows: same sums, same order (external ids sort as
        dense ones)."""
        ids, weights = _hurried(ids, weights, deadline)
        keys = [str(x) for x in ids.tolist()]
        rows = reader.neighbour_rows(self.name, keys, timeout_ms=deadline.remaining_ms())
        first = _gathered(rows, len(keys), self.name)
        if first is None:  # none of the history items has a row: nothing to offer, not a fault
            return _empty()
        kind = first[0].dtype.kind

        # The rows the first hop used, re-read with the second hop's: if one changed, a push
        # came in between and the second hop is skipped rather than mixing two builds (all
        # unchanged, the answer is the new build's own). Missing rows are not re-read: a
        # garbled one would be counted as a store failure twice.
        used = [(key, r) for key, r in zip(keys, rows, strict=False) if r is not None]

        def fetch(more: npt.NDArray[Any]) -> Gathered | None:
            extra = [str(x) for x in more.tolist()]
            try:  # the first hop stands: a failed second read only skips the second hop
                again = reader.neighbour_rows(
                    self.name, [key for key, _ in used] + extra, timeout_ms=deadline.remaining_ms()
                )
                if len(again) != len(used) + len(extra):
                    return None
                if not all(_same_row(r, b) for (_, r), b in zip(used, again, strict=False)):
                    return None
                got = _gathered(again[len(used) :], len(extra), self.name)
            except StoreError:
                return None
            return got if got is not None and got[0].dtype.kind == kind else None

        cand, scores = neighbourhood(
            first,
            _as_kind(ids, kind),
            weights,
            k,
            fetch,
            deadline=deadline,
            drop=None if seeds is None else _as_kind(seeds, kind),
            self_weight=self._self_weight,
            expand_decay=self._expand,
        )
        if cand.size == 0:
            return _empty()
        return cand, scores


def _gathered(rows: Sequence[Row | None], expected: int, source: str) -> Gathered | None:
    """Pushed rows as one ``Gathered``; None when no item has a row. StoreError when the reader
    returned another count of rows, or rows mixing int and str ids (a foreign push, not ours)."""
    if len(rows) != expected:
        raise StoreError(f"{source}: {len(rows)} pushed rows read for {expected} items")
    full = [r for r in rows if r is not None and r[0].size]
    if not full:
        return None
    if len({r[0].dtype.kind for r in full}) != 1:
        raise StoreError(f"{source}: pushed rows mix int and str ids: a foreign push?")
    return (
        np.concatenate([r[0] for r in full]),
        np.concatenate([r[1] for r in full]).astype(np.float64),
        np.array([0 if r is None else r[0].size for r in rows], dtype=np.int64),
    )


def _same_row(a: Row | None, b: Row | None) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))


def _as_kind(ids: npt.NDArray[Any], kind: str) -> npt.NDArray[Any]:
    """External ids as the pushed rows spell them (int64 or str); an id that cannot be one
    (text in an integer catalog) becomes -1, which has no row."""
    if kind == "U":
        return ids.astype(str)
    if ids.dtype.kind in "iu":
        return ids.astype(np.int64)
    text = ids.astype(str)
    digits = np.char.isdigit(np.char.lstrip(text, "-")) & (np.char.str_len(text) < 19)
    out = np.full(ids.size, -1, dtype=np.int64)
    out[digits] = text[digits].astype(np.int64)
    return out


def _empty() -> tuple[npt.NDArray[Any], npt.NDArray[np.float32]]:
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
