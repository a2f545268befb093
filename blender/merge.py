"""Merge strategies: many ranked lists in, one deduplicated ranking with provenance out.

Everything is a few vectorised passes over the concatenated lists (concatenate, the one
sum-by-id kernel ``sources.history.IdGroups``, lexsort): no Python loop over candidates. Results
depend only on the lists and their order in the config, never on which source finished first;
ties are broken by item id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from blender.filters import Exclusions
from retrieval import kernels
from sources.history import IdGroups, top_k_order

__all__ = ["Merged", "SourceList", "merge", "merge_numpy", "unify_id_dtypes"]

_NO_IDS = np.empty(0, dtype=np.int64)

Strategy = Literal["rrf", "quota", "score", "calibrated"]


@dataclass(slots=True)
class SourceList:
    """One source's surviving candidates: ids, scores and their rank in the source's own list."""

    ids: npt.NDArray[Any]
    scores: npt.NDArray[np.float32]
    ranks: npt.NDArray[np.int32]
    weight: float = 1.0
    quota: int | None = None
    curve: npt.NDArray[np.float64] | None = None  # hit probability by rank ("calibrated")


@dataclass(slots=True)
class Merged:
    """The merged slate, best first and at most k long: the columns a ``CandidateSet`` is made
    of. ``ranks[i, j]`` is candidate ``i``'s 0-based rank in source ``j``'s list (``j`` in
    config order, whether or not that source answered), -1 where it did not return it."""

    item_ids: npt.NDArray[Any]
    scores: npt.NDArray[np.float32]
    ranks: npt.NDArray[np.int32]  # (n, n_sources), -1 where absent
    filtered: int = 0  # distinct candidates the exclusions removed (seen, excluded, blocked)


def unify_id_dtypes(arrays: Sequence[npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
    """Integer ids stay int64; if any source speaks strings, everyone does."""
    if any(a.dtype.kind in "US" for a in arrays if a.size):
        return [a.astype(str) if a.dtype.kind not in "US" else a for a in arrays]
    return [a.astype(np.int64, copy=False) for a in arrays]


def merge(
    lists: Sequence[SourceList | None],
    k: int,
    strategy: Strategy,
    rrf_k: float,
    exclude: Sequence[Exclusions] = (),
) -> Merged:
    """Blend ``lists`` (one slot per configured source, None when it produced nothing).

    ``rrf`` and ``score`` over integer ids run in one compiled call that releases the GIL
    (``retrieval.kernels.merge_sum``); the rest, and the reference it is tested against, in
    ``merge_numpy``: the same slate either way, bit for bit.
    """
    present = [(j, s) for j, s in enumerate(lists) if s is not None and s.ids.size]
    int_ids = all(s.ids.dtype == np.int64 for _, s in present)
    if strategy not in ("rrf", "score") or not present or k <= 0 or not int_ids:
        return merge_numpy(lists, k, strategy, rrf_k, exclude)
    ids = np.concatenate([s.ids for _, s in present])
    src = np.concatenate([np.full(s.ids.size, j, dtype=np.int32) for j, s in present])
    rank = np.concatenate([s.ranks for _, s in present]).astype(np.int32, copy=False)
    contrib = _contributions(present, strategy, rrf_k, rank)
    banned = [e.int_ids for e in exclude if e.int_ids.size]
    if len(banned) > 1:
        banned = [np.unique(np.concatenate(banned))]
    item_ids, scores, ranks, filtered = kernels.merge_sum(
        ids, contrib, src, rank, len(lists), k, banned[0] if banned else _NO_IDS
    )
    return Merged(item_ids, scores, ranks, filtered)


def _contributions(
    present: Sequence[tuple[int, SourceList]],
    strategy: Strategy,
    rrf_k: float,
    rank: npt.NDArray[np.int32],
) -> npt.NDArray[np.float64]:
    """Each returned candidate's share of its blended score, in the lists' order."""
    if strategy == "rrf":
        weights = np.array([s.weight for _, s in present], dtype=np.float64)
        wsrc = np.repeat(weights, [s.ids.size for _, s in present])
        return np.asarray(wsrc / (rrf_k + rank.astype(np.float64) + 1.0))
    parts = []  # score: min-max normalised per source, times weight
    for _, s in present:
        sc = s.scores.astype(np.float64)
        lo, hi = float(sc.min()), float(sc.max())
        norm = (sc - lo) / (hi - lo) if hi > lo else np.ones_like(sc)
        parts.append(norm * s.weight)
    return np.concatenate(parts)


def merge_numpy(
    lists: Sequence[SourceList | None],
    k: int,
    strategy: Strategy,
    rrf_k: float,
    exclude: Sequence[Exclusions] = (),
) -> Merged:
    """``merge`` in numpy, for every strategy and id kind: the reference the compiled sum is
    tested against, and the path of string ids, ``quota`` and ``calibrated``.

    Excluded ids are dropped after deduplication, where a few binary searches of the banned ids
    in the sorted candidates replace a membership test per returned id; they take no slot and,
    with ``quota``, count against no source's quota.
    """
    n_sources = len(lists)
    present = [(j, s) for j, s in enumerate(lists) if s is not None and s.ids.size]
    if not present or k <= 0:
        return Merged(
            np.empty(0, dtype=np.int64),
            np.empty(0, dtype=np.float32),
            np.empty((0, n_sources), dtype=np.int32),
        )
    ids = np.concatenate(unify_id_dtypes([s.ids for _, s in present]))
    src = np.concatenate([np.full(s.ids.size, j, dtype=np.int32) for j, s in present])
    rank = np.concatenate([s.ranks for _, s in present])
    groups = IdGroups(ids)
    uniq, inv = groups.ids, groups.inverse
    ranks = np.full((uniq.size, n_sources), -1, dtype=np.int32)
    # Reverse so that, if a source broke the contract and repeated an id, its best rank wins.
    ranks[inv[::-1], src[::-1]] = rank[::-1]
    allowed = np.ones(uniq.size, dtype=bool)
    for e in exclude:
        allowed &= e.allowed_sorted(uniq)
    filtered = uniq.size - int(np.count_nonzero(allowed))

    if strategy == "quota":
        order, scores = _quota_order(present, uniq, inv, src, k, allowed)
        return Merged(uniq[order], scores, ranks[order], filtered)

    if strategy == "calibrated":
        slate = _calibrated(present, groups, rank, ranks, k, allowed)
        slate.filtered = filtered
        return slate

    contrib = _contributions(present, strategy, rrf_k, rank)
    blended = groups.sum(contrib)
    order = _best(blended, uniq, k, allowed)
    return Merged(uniq[order], blended[order].astype(np.float32), ranks[order], filtered)


def _best(
    scores: npt.NDArray[np.float64], uniq: npt.NDArray[Any], k: int, allowed: npt.NDArray[np.bool_]
) -> npt.NDArray[np.intp]:
    if allowed.all():
        return top_k_order(scores, uniq, k)
    keep = np.flatnonzero(allowed)
    return keep[top_k_order(scores[keep], uniq[keep], k)]


def _calibrated(
    present: Sequence[tuple[int, SourceList]],
    groups: IdGroups,
    rank: npt.NDArray[np.int32],
    ranks: npt.NDArray[np.int32],
    k: int,
    allowed: npt.NDArray[np.bool_],
) -> Merged:
    """Rank by the chance of a hit: 1 - prod(1 - p_j(rank_j)) over the sources that found it.

    Sources' quotas, when set, are floors: each source's top ``quota`` are kept whatever their
    chance, and the remaining slots go to the best chances overall.
    """
    parts = []
    for _, s in present:
        if s.curve is None or s.curve.size == 0:
            raise ValueError("calibrated merge needs a rank curve for every source")
        p = s.curve[np.minimum(s.ranks, s.curve.size - 1)]
        parts.append(np.log1p(-np.clip(p, 0.0, 0.999999)))
    uniq, inv = groups.ids, groups.inverse
    log_miss = groups.sum(np.concatenate(parts))
    chance = -np.expm1(log_miss)
    floor = np.zeros(uniq.size, dtype=bool)
    start = 0
    for _, s in present:
        stop = start + s.ids.size
        if s.quota:
            floor[inv[start:stop][: s.quota]] = True
        start = stop
    floor &= allowed
    if floor.any():
        boosted = chance + floor * 2.0  # floors sort first, then by chance
        order = _best(boosted, uniq, k, allowed)
        order = order[np.lexsort((uniq[order], -chance[order]))]
    else:
        order = _best(chance, uniq, k, allowed)
    return Merged(uniq[order], chance[order].astype(np.float32), ranks[order])


def _quota_order(
    present: Sequence[tuple[int, SourceList]],
    uniq: npt.NDArray[Any],
    inv: npt.NDArray[np.intp],
    src: npt.NDArray[np.int32],
    k: int,
    allowed: npt.NDArray[np.bool_],
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Each source in priority order fills its quota with items no earlier source took; slots a
    source cannot fill go to the others round-robin; the slate interleaves sources by rank."""
    quotas = _quotas([s for _, s in present], k)
    taken = ~allowed  # excluded items are never picked
    pos_in_src = np.zeros(inv.size, dtype=np.int64)  # position among the source's own picks
    picked = np.zeros(inv.size, dtype=bool)
    start = 0
    for (_, s), q in zip(present, quotas, strict=True):
        stop = start + s.ids.size
        cand = inv[start:stop]
        free = ~taken[cand]
        # First occurrence within this source only (contract says unique; be safe anyway).
        keep = free & (np.cumsum(free) <= q)
        chosen = cand[keep]
        taken[chosen] = True
        picked[start:stop] = keep
        pos_in_src[start:stop][keep] = np.arange(chosen.size)
        start = stop
    # Unused quota: leftover entries, interleaved by their position in what is left of each list.
    remaining = k - int(picked.sum())
    extra_mask = np.zeros(inv.size, dtype=bool)
    if remaining > 0:
        left = ~picked & ~taken[inv]
        left_pos = np.zeros(inv.size, dtype=np.int64)
        start = 0
        for _, s in present:
            stop = start + s.ids.size
            seg = left[start:stop]
            left_pos[start:stop][seg] = np.arange(int(seg.sum()))
            start = stop
        cand_idx = np.flatnonzero(left)
        order = np.lexsort((src[cand_idx], left_pos[cand_idx]))
        cand_idx = cand_idx[order]
        _, first = np.unique(inv[cand_idx], return_index=True)
        extra = cand_idx[np.sort(first)][:remaining]
        extra_mask[extra] = True
        pos_in_src[extra] = np.arange(extra.size)
    # Slate order: quota picks interleaved by (position, priority), then redistributed extras.
    sel = np.flatnonzero(picked | extra_mask)
    phase = extra_mask[sel].astype(np.int8)
    order = np.lexsort((src[sel], pos_in_src[sel], phase))
    rows = inv[sel[order]][:k]
    m = rows.size
    scores = (1.0 - np.arange(m, dtype=np.float32) / max(m, 1)).astype(np.float32)
    return rows, scores


def _quotas(lists: Sequence[SourceList], k: int) -> list[int]:
    """Explicit quotas as given; sources without one share what is left of k equally."""
    fixed = sum(s.quota for s in lists if s.quota is not None)
    free = [i for i, s in enumerate(lists) if s.quota is None]
    share, rest = divmod(max(k - fixed, 0), len(free)) if free else (0, 0)
    out = []
    for i, s in enumerate(lists):
        if s.quota is not None:
            out.append(s.quota)
        else:
            out.append(share + (1 if free.index(i) < rest else 0))
    return out
