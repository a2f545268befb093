"""The blend's per-request arithmetic, compiled: numba, ``nogil``, compiled when this is imported.

A blend's arithmetic (summing ~20 neighbour rows, deduplicating ~4,000 ids, picking the top
1,000) is well under a millisecond of CPU, but as a chain of small numpy calls it held the GIL
for most of a blend, so threads in one process served no more than one thread. Each kernel
here is one call that releases the GIL for its whole run.

Why numba and not Cython/C++ (measured on this machine, README "Compiled kernels"): both release
the GIL and run the same loop within ~1.5x of each other (a call costs ~1 us more through
numba's dispatcher); numba ships wheels for Linux, macOS and Windows on x86-64 and arm64, so
users need no compiler, and the package stays pure Python (a Cython extension would need
per-platform wheels built in CI and a compiler for every source install). Its price is the
compile: every signature is given below, so it happens (or is read back from numba's cache)
when this module is imported, never on a request.

Every kernel reproduces the numpy reference it replaces bit for bit: the same float operations
in the same order, no fastmath; ``tests/test_kernels.py`` checks them against the references,
which stay in ``sources/neighbours.py`` and ``blender/merge.py``. Ids are integers here; string
catalogues take the numpy path.

Scratch: each thread keeps one open-addressing table (``Scratch``), grown when a request needs
more and otherwise reused; a generation stamp marks the live slots, so nothing is cleared
between calls.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numba as nb
import numpy as np
import numpy.typing as npt

__all__ = [
    "Scratch",
    "check_ranked",
    "first_hop",
    "gather_ids",
    "lookup_sorted",
    "merge_sum",
    "scratch",
    "second_hop",
    "sum_unique",
]

_JIT: dict[str, Any] = {"nogil": True, "cache": True, "error_model": "numpy"}
_GOLD = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the high bits of x * 2^64 / phi

_ro_i32 = nb.types.Array(nb.int32, 1, "C", readonly=True)
_ro_i64 = nb.types.Array(nb.int64, 1, "C", readonly=True)
_ro_f32 = nb.types.Array(nb.float32, 1, "C", readonly=True)
_ro_f64 = nb.types.Array(nb.float64, 1, "C", readonly=True)
_i64 = nb.types.Array(nb.int64, 1, "C")
_f64 = nb.types.Array(nb.float64, 1, "C")
_i32 = nb.types.Array(nb.int32, 1, "C")
_i32_2d = nb.types.Array(nb.int32, 2, "C")
_f32 = nb.types.Array(nb.float32, 1, "C")
_TABLE = (_i64, _f64, _i64, _i32, _i64)  # keys, sums, stamp, order, gen: see Scratch


class Scratch:
    """One thread's hash table: ``keys``/``sums`` per slot, ``stamp`` marks the slots of the
    current call (``gen``), ``order`` lists them in first-seen order. Power-of-two sized."""

    __slots__ = ("gen", "keys", "order", "stamp", "sums")

    def __init__(self, capacity: int = 1 << 16) -> None:
        """``capacity`` slots (rounded up to a power of two): by default room for the second
        hop's entries on top of the first hop's, so a default request never grows the table
        (a grown table's fresh pages are faulted in on the request that grew it)."""
        cap = 1 << max(int(capacity) - 1, 1).bit_length()
        self.keys = np.empty(cap, dtype=np.int64)
        self.sums = np.empty(cap, dtype=np.float64)
        self.stamp = np.zeros(cap, dtype=np.int64)
        self.order = np.empty(cap, dtype=np.int32)
        self.gen = np.zeros(1, dtype=np.int64)

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    def table(self) -> tuple[npt.NDArray[Any], ...]:
        return self.keys, self.sums, self.stamp, self.order, self.gen

    def fit(self, entries: int) -> Scratch:
        """This table, or a new one at least twice ``entries``: kept for the thread's next calls
        up to ``_KEEP_SLOTS``, used once above it (a rare huge request must not leave every lane
        thread holding tens of megabytes)."""
        if 2 * entries <= self.capacity:
            return self
        grown = Scratch(4 * entries)
        if grown.capacity <= _KEEP_SLOTS:
            _local.scratch = grown
        return grown


_local = threading.local()
_KEEP_SLOTS = 1 << 20  # 28 MB a table: ~260k summed entries, far above a default request's ~4k


def scratch() -> Scratch:
    """The calling thread's table (made on its first call, then reused)."""
    s: Scratch | None = getattr(_local, "scratch", None)
    if s is None:
        s = _local.scratch = Scratch()
    return s


def _on_table(kernel: Any, *args: Any) -> list[Any]:
    """``kernel(*args, *table)`` on this thread's table, grown until the call fits. Every kernel
    returns the entries it needs first: 0 once it ran, else how many it would need."""
    s = scratch()
    while True:
        need, *out = kernel(*args, *s.table())
        if need == 0:
            return out
        s = s.fit(need)


# -- helpers inlined into the kernels -----------------------------------------------------------


@nb.njit(inline="always", **_JIT)
def _slot(keys, stamp, g, mask, x):
    i = np.int64((np.uint64(x) * _GOLD) >> np.uint64(32)) & mask
    while stamp[i] == g and keys[i] != x:
        i = (i + 1) & mask
    return i


@nb.njit(inline="always", **_JIT)
def _in_sorted(sorted_ids, x):
    n = sorted_ids.shape[0]
    if n == 0:
        return False
    p = np.searchsorted(sorted_ids, x)
    return p < n and sorted_ids[p] == x


@nb.njit(**_JIT)
def _top_k(ids, scores, k):
    """``sources.history.top_k_order``: the k best scores, ties to the smaller id (then to the
    earlier position).

    One quicksort on the scores, then each run of equal scores put in (id, position) order: the
    same order as the reference's two stable sorts, at a half to a third of their cost when
    runs of tied scores are short (as in a blend); about the same when most scores tie.
    """
    n = scores.shape[0]
    if k <= 0 or n == 0:
        return np.empty(0, dtype=np.int64)
    if n > k:
        threshold = np.partition(scores.copy(), n - k)[n - k]
        cut = np.flatnonzero(scores >= threshold)
    else:
        cut = np.arange(n)
    order = cut[np.argsort(-scores[cut])]
    m = order.shape[0]
    i = 0
    while i < m and i < k:
        s = scores[order[i]]
        j = i + 1
        while j < m and scores[order[j]] == s:
            j += 1
        if j - i > 16:
            run = np.sort(order[i:j])  # positions ascending, then a stable sort by id
            order[i:j] = run[np.argsort(ids[run], kind="mergesort")]
        elif j - i > 1:  # a short run: insertion sort by (id, position), in place
            for a in range(i + 1, j):
                x = order[a]
                b = a - 1
                while b >= i and (
                    ids[order[b]] > ids[x] or (ids[order[b]] == ids[x] and order[b] > x)
                ):
                    order[b + 1] = order[b]
                    b -= 1
                order[b + 1] = x
        i = j
    return order[:k]


# -- co-visitation / item-CF: sums of neighbour rows ------------------------------------------


@nb.njit(
    nb.types.Tuple((nb.int64, _i32, _f64))(
        _ro_i64, _ro_i32, _ro_f32, _ro_i32, _ro_f32, nb.float64, _ro_i32, nb.int64, *_TABLE
    ),
    **_JIT,
)
def _first_hop(
    indptr, indices, values, rows, weights, self_weight, drop, k, keys, sums, stamp, order, gen
):
    n_rows = rows.shape[0]
    need = n_rows
    for h in range(n_rows):
        need += indptr[rows[h] + 1] - indptr[rows[h]]
    if 2 * need > keys.shape[0]:
        return need, np.empty(0, dtype=np.int32), np.empty(0, dtype=np.float64)
    g = gen[0] + 1
    gen[0] = g
    mask = keys.shape[0] - 1
    m = 0
    for h in range(n_rows):
        w = np.float64(weights[h])
        for e in range(indptr[rows[h]], indptr[rows[h] + 1]):
            x = np.int64(indices[e])
            i = _slot(keys, stamp, g, mask, x)
            if stamp[i] != g:  # first sight: 0.0 + v, as np.bincount adds
                stamp[i], keys[i], sums[i], order[m] = g, x, 0.0, i
                m += 1
            sums[i] += np.float64(values[e]) * w
    if self_weight > 0:
        sw = np.float32(self_weight)
        for h in range(n_rows):
            a, b = indptr[rows[h]], indptr[rows[h] + 1]
            if b == a:
                continue
            top = np.float64(values[a])
            for e in range(a + 1, b):
                top = max(top, np.float64(values[e]))
            own = np.float64(weights[h] * sw) * top
            if own > 0:
                x = np.int64(rows[h])
                i = _slot(keys, stamp, g, mask, x)
                if stamp[i] != g:
                    stamp[i], keys[i], sums[i], order[m] = g, x, 0.0, i
                    m += 1
                sums[i] += own
    ids = np.empty(m, dtype=np.int64)
    scores = np.empty(m, dtype=np.float64)
    n = 0
    for j in range(m):
        i = order[j]
        if not _in_sorted(drop, keys[i]):
            ids[n] = keys[i]
            scores[n] = sums[i]
            n += 1
    best = _top_k(ids[:n], scores[:n], k)
    return 0, ids[best].astype(np.int32), scores[best]


@nb.njit(
    nb.types.Tuple((nb.int64, _i32, _f32))(
        _ro_i64, _ro_i32, _ro_f32, _ro_i32, _ro_f64, _ro_i32, _ro_i32, nb.int64, nb.float64,
        nb.float32, nb.int64, *_TABLE,
    ),
    **_JIT,
)  # fmt: skip
def _second_hop(
    indptr,
    indices,
    values,
    best,
    best_scores,
    rows,
    drop,
    k,
    decay,
    cap,
    read,
    keys,
    sums,
    stamp,
    order,
    gen,
):
    n_best = best.shape[0]
    floor = best_scores[n_best - 1]
    first = best_scores.astype(np.float32)
    history = np.sort(rows)
    total = 0
    full = 0
    for h in range(rows.shape[0]):
        length = indptr[rows[h] + 1] - indptr[rows[h]]
        if length > 0:
            total += length
            full += 1
    pool = np.empty(n_best, dtype=np.int64)
    n_pool = 0
    for j in range(n_best):
        if best_scores[j] > 0 and not _in_sorted(history, best[j]):
            pool[n_pool] = j
            n_pool += 1
    if n_pool == 0 or floor <= 0 or full == 0:
        return 0, best.copy(), first
    n_seeds = min(n_pool, np.int64(math.ceil(read * (k - n_best) / (np.float64(total) / full))))
    need = n_best + drop.shape[0]
    for j in range(n_seeds):
        need += indptr[best[pool[j]] + 1] - indptr[best[pool[j]]]
    if 2 * need > keys.shape[0]:
        return need, best.copy(), first
    g = gen[0] + 1
    gen[0] = g
    mask = keys.shape[0] - 1
    # First-hop and dropped ids are not new: parked in the table at -inf, never listed.
    for x in best:
        i = _slot(keys, stamp, g, mask, np.int64(x))
        stamp[i], keys[i], sums[i] = g, x, -np.inf
    for x in drop:
        i = _slot(keys, stamp, g, mask, np.int64(x))
        stamp[i], keys[i], sums[i] = g, x, -np.inf
    m = 0
    for j in range(n_seeds):
        r = best[pool[j]]
        a, b = indptr[r], indptr[r + 1]
        if b == a:
            continue
        top = np.float64(values[a])
        for e in range(a + 1, b):
            top = max(top, np.float64(values[e]))
        norm = best_scores[pool[j]] / top if top > 0 else 0.0
        for e in range(a, b):
            x = np.int64(indices[e])
            i = _slot(keys, stamp, g, mask, x)
            if stamp[i] != g:
                stamp[i], keys[i], sums[i], order[m] = g, x, 0.0, i
                m += 1
            sums[i] += np.float64(values[e]) * norm
    ids = np.empty(m, dtype=np.int64)
    scores = np.empty(m, dtype=np.float64)
    for j in range(m):
        ids[j] = keys[order[j]]
        scores[j] = sums[order[j]]
    pick = _top_k(ids, scores, k - n_best)
    if pick.shape[0] == 0:
        return 0, best.copy(), first
    new_scores = scores[pick]
    out_ids = np.empty(n_best + pick.shape[0], dtype=np.int32)
    out_scores = np.empty(n_best + pick.shape[0], dtype=np.float32)
    out_ids[:n_best] = best
    out_scores[:n_best] = first
    scale = floor * decay
    for j in range(pick.shape[0]):
        s = np.float32(scale * new_scores[j] / new_scores[0])
        out_ids[n_best + j] = ids[pick[j]]
        out_scores[n_best + j] = cap if cap < s else s
    return 0, out_ids, out_scores


def first_hop(
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int32],
    values: npt.NDArray[np.float32],
    rows: npt.NDArray[np.int32],
    weights: npt.NDArray[np.float32],
    self_weight: float,
    drop: npt.NDArray[np.int32],
    k: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float64]]:
    """``sources.neighbours.first_hop`` over a local CSR: the top ``k`` of the weighted sum of
    ``rows``' rows (plus each history item's own score), ``drop`` (sorted) left out."""
    ids, scores = _on_table(
        _first_hop, indptr, indices, values, rows, weights, self_weight, drop, k
    )
    return ids, scores


def second_hop(
    indptr: npt.NDArray[np.int64],
    indices: npt.NDArray[np.int32],
    values: npt.NDArray[np.float32],
    best: npt.NDArray[np.int32],
    best_scores: npt.NDArray[np.float64],
    rows: npt.NDArray[np.int32],
    drop: npt.NDArray[np.int32],
    k: int,
    decay: float,
    read: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """``sources.neighbours._second_hop`` over a local CSR: ``best`` followed by the neighbours
    of its best non-history items, each below the weakest first-hop score."""
    cap = np.nextafter(np.float32(best_scores[-1]), np.float32(0))
    ids, scores = _on_table(
        _second_hop, indptr, indices, values, best, best_scores, rows, drop, k, decay, cap, read
    )
    return ids, scores


# -- the blend's merge ------------------------------------------------------------------------


@nb.njit(
    nb.types.Tuple((nb.int64, _i64, _f32, _i32_2d, nb.int64))(
        _ro_i64, _ro_f64, _ro_i32, _ro_i32, nb.int64, nb.int64, _ro_i64, *_TABLE
    ),
    **_JIT,
)
def _merge_sum(ids, contrib, src, rank, n_sources, k, banned, keys, sums, stamp, order, gen):
    # order[slot]: the slot's position in uniq (this kernel needs no first-seen list)
    n = ids.shape[0]
    if 2 * n > keys.shape[0]:
        return n, ids[:0].copy(), np.empty(0, np.float32), np.empty((0, n_sources), np.int32), 0
    g = gen[0] + 1
    gen[0] = g
    mask = keys.shape[0] - 1
    uniq = np.empty(n, dtype=np.int64)
    blended = np.empty(n, dtype=np.float64)
    where = np.empty(n, dtype=np.int64)  # each element's distinct id, as a position in uniq
    m = 0
    for i in range(n):
        s = _slot(keys, stamp, g, mask, ids[i])
        if stamp[s] != g:  # first sight: 0.0 + contrib, as np.bincount adds
            stamp[s] = g
            keys[s] = ids[i]
            order[s] = m
            uniq[m] = ids[i]
            blended[m] = 0.0
            m += 1
        where[i] = order[s]
        blended[order[s]] += contrib[i]
    allowed = np.empty(m, dtype=np.int64)
    n_allowed = 0
    for j in range(m):
        if not _in_sorted(banned, uniq[j]):
            allowed[n_allowed] = j
            n_allowed += 1
    ranks = np.full((m, n_sources), -1, dtype=np.int32)
    for i in range(n):
        u = where[i]
        if ranks[u, src[i]] == -1:  # a repeated id keeps its best (first) rank
            ranks[u, src[i]] = rank[i]
    keep = allowed[:n_allowed]
    best = keep[_top_k(uniq[keep], blended[keep], k)]
    return 0, uniq[best], blended[best].astype(np.float32), ranks[best], m - n_allowed


def merge_sum(
    ids: npt.NDArray[np.int64],
    contrib: npt.NDArray[np.float64],
    src: npt.NDArray[np.int32],
    rank: npt.NDArray[np.int32],
    n_sources: int,
    k: int,
    banned: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int32], int]:
    """``blender.merge.merge`` for sum strategies over int ids: each distinct id's summed
    ``contrib``, its rank in every source (-1: absent), the top ``k`` of those not ``banned``
    (sorted), ties to the smaller id; and how many distinct ids ``banned`` removed."""
    uniq, scores, ranks, filtered = _on_table(
        _merge_sum, ids, contrib, src, rank, n_sources, k, banned
    )
    return uniq, scores, ranks, int(filtered)


@nb.njit(nb.types.Tuple((nb.int64, nb.int64, nb.boolean))(_ro_i64, _ro_f32, *_TABLE), **_JIT)
def _check_ranked(ids, scores, keys, sums, stamp, order, gen):
    n = ids.shape[0]
    for j in range(n):
        if not np.isfinite(scores[j]):
            return 0, j, False
    if 2 * n > keys.shape[0]:
        return n, -1, False
    g = gen[0] + 1
    gen[0] = g
    mask = keys.shape[0] - 1
    for j in range(n):
        i = _slot(keys, stamp, g, mask, ids[j])
        if stamp[i] == g:
            return 0, -1, True
        stamp[i] = g
        keys[i] = ids[j]
    return 0, -1, False


def check_ranked(ids: npt.NDArray[np.int64], scores: npt.NDArray[np.float32]) -> tuple[int, bool]:
    """A source's answer in one pass: the first non-finite score's position (-1: none), and
    whether an id occurs twice (checked only when every score is finite)."""
    bad, repeats = _on_table(_check_ranked, np.ascontiguousarray(ids), np.ascontiguousarray(scores))
    return int(bad), bool(repeats)


@nb.njit(nb.types.Tuple((_i64, _f64))(_ro_i64, _ro_f64), **_JIT)
def _sum_unique(ids, weights):
    n = ids.shape[0]
    order = np.argsort(ids)
    group = np.empty(n, np.int64)
    uniq = np.empty(n, np.int64)
    m = -1
    for j in range(n):
        i = order[j]
        if m < 0 or ids[i] != uniq[m]:
            m += 1
            uniq[m] = ids[i]
        group[i] = m
    sums = np.zeros(m + 1, np.float64)
    for i in range(n):  # in input order, as np.bincount adds
        sums[group[i]] += weights[i]
    return uniq[: m + 1].copy(), sums


def sum_unique(
    ids: npt.NDArray[np.int64], weights: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """``sources.history.sum_by_id`` for int64 ids in one call: sorted distinct ids, and each
    one's sum of ``weights`` added in input order (the same bits)."""
    return _sum_unique(
        np.ascontiguousarray(ids, np.int64), np.ascontiguousarray(weights, np.float64)
    )


@nb.njit(_i32(_ro_i64, _ro_i64, nb.int32), **_JIT)
def _lookup_sorted(values, keys, missing):
    n = values.shape[0]
    out = np.empty(keys.shape[0], np.int32)
    for j in range(keys.shape[0]):
        p = np.searchsorted(values, keys[j])
        out[j] = p if p < n and values[p] == keys[j] else missing
    return out


def lookup_sorted(
    values: npt.NDArray[np.int64], keys: npt.NDArray[np.int64], missing: int
) -> npt.NDArray[np.int32]:
    """Each key's position in the sorted ``values`` (``missing`` when absent): an int
    ``IdMap.to_dense`` in one call instead of seven numpy calls."""
    return _lookup_sorted(
        np.ascontiguousarray(values), np.ascontiguousarray(keys, np.int64), np.int32(missing)
    )


@nb.njit(nb.types.Tuple((nb.int64, _i64))(_ro_i64, _ro_i32), **_JIT)
def _gather_ids(values, dense):
    n = values.shape[0]
    out = np.empty(dense.shape[0], np.int64)
    for j in range(dense.shape[0]):
        d = dense[j]
        if d < 0 or d >= n:
            return j, out[:0]
        out[j] = values[d]
    return -1, out


def gather_ids(
    values: npt.NDArray[np.int64], dense: npt.NDArray[np.int32]
) -> tuple[int, npt.NDArray[np.int64]]:
    """``values[dense]`` and -1, or the first out-of-range position and nothing: an int
    ``IdMap.to_external`` in one call."""
    bad, out = _gather_ids(np.ascontiguousarray(values), np.ascontiguousarray(dense, np.int32))
    return int(bad), out
