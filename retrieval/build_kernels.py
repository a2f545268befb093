"""The builders' loops, compiled (numba): what numpy could only do with whole-array temporaries.

Co-visitation's pair generation made, per distance d, a mask, two index arrays and three
gathered columns over the whole chunk, then concatenated them all: twice the pairs' own size.
Here the pairs are counted, then written once, in the same order with the same arithmetic.

Cutting each row of a sparse product to its top k took one packed sort key, two argsorts and
four gathers over every entry, about 46 bytes per entry alive at once: 2.8 GB for one of
co-visitation's 60M-pair partitions at 100M events. Here each row is sorted on its own, so only
the output is allocated. Loaded by builds and the log reader (each imports it when first
called), never by serving.

Dictionary-encoding an int64 session column (Arrow's hash table) took 4.4 GB at 100M events
and 18M sessions, the read's peak; ``FirstSeenCodes`` gives the same codes from a table of
16 bytes a session.

Each kernel gives what its numpy reference gives, bit for bit (``tests/test_kernels.py``).
"""

from __future__ import annotations

from typing import Any

import numba as nb
import numpy as np
import numpy.typing as npt

__all__ = ["FirstSeenCodes", "row_pointers", "session_pairs", "top_k_csr", "user_time_order"]

_JIT: dict[str, Any] = {"nogil": True, "cache": True, "error_model": "numpy"}
_ro_i64 = nb.types.Array(nb.int64, 1, "C", readonly=True)
_ro_i32 = nb.types.Array(nb.int32, 1, "C", readonly=True)
_ro_f32 = nb.types.Array(nb.float32, 1, "C", readonly=True)
_ro_f64 = nb.types.Array(nb.float64, 1, "C", readonly=True)
_i64 = nb.types.Array(nb.int64, 1, "C")
_i32 = nb.types.Array(nb.int32, 1, "C")
_f32 = nb.types.Array(nb.float32, 1, "C")
_ro_bool = nb.types.Array(nb.boolean, 1, "C", readonly=True)


@nb.njit(nb.types.Tuple((nb.boolean, _i64))(_ro_i64, nb.int64), **_JIT)
def _row_pointers(rows, n_rows):
    indptr = np.zeros(n_rows + 1, np.int64)
    for t in range(rows.size):
        r = rows[t]
        if r < 0 or r >= n_rows or (t > 0 and r < rows[t - 1]):
            return False, indptr
        indptr[r + 1] += 1
    for r in range(n_rows):
        indptr[r + 1] += indptr[r]
    return True, indptr


@nb.njit(nb.types.Tuple((_i64, _i32, _f32))(_ro_i64, _ro_i32, _ro_f32, nb.int64), **_JIT)
def _top_k_csr(indptr, cols, vals, k):
    n_rows = indptr.size - 1
    out_ptr = np.zeros(n_rows + 1, np.int64)
    for r in range(n_rows):
        out_ptr[r + 1] = out_ptr[r] + min(indptr[r + 1] - indptr[r], k)
    out_cols = np.empty(out_ptr[n_rows], np.int32)
    out_vals = np.empty(out_ptr[n_rows], np.float32)
    for r in range(n_rows):
        start, m = indptr[r], indptr[r + 1] - indptr[r]
        if m == 0:
            continue
        seg_cols = cols[start : start + m]
        seg_vals = vals[start : start + m]
        ascending = True
        for t in range(1, m):
            if seg_cols[t] < seg_cols[t - 1]:
                ascending = False
                break
        if not ascending:  # ties must go to the smaller column: put the row in column order
            by_col = np.argsort(seg_cols, kind="mergesort")
            seg_cols = seg_cols[by_col]
            seg_vals = seg_vals[by_col]
        # Stable on the descending score: ties keep the column order (smaller first).
        order = np.argsort(-seg_vals, kind="mergesort")
        at = out_ptr[r]
        for t in range(min(m, k)):
            out_cols[at + t] = seg_cols[order[t]]
            out_vals[at + t] = seg_vals[order[t]]
    return out_ptr, out_cols, out_vals


def row_pointers(rows: npt.NDArray[np.int64], n_rows: int) -> npt.NDArray[np.int64] | None:
    """CSR row pointers for entries grouped by ascending row; None when they are not, or a row
    is out of ``[0, n_rows)``."""
    ok, indptr = _row_pointers(rows, n_rows)
    return indptr if ok else None


def top_k_csr(
    indptr: npt.NDArray[np.int64],
    cols: npt.NDArray[np.int32],
    vals: npt.NDArray[np.float32],
    k: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Each CSR row's ``k`` largest values, sorted descending (ties: smaller column), as new
    CSR arrays. Rows may list their columns in any order. Scores must be free of NaN and of
    signed zeros mixed in one row (the builders' are positive)."""
    return _top_k_csr(indptr, cols, vals, k)


_PAIRS = nb.types.Tuple(
    (
        nb.types.Array(nb.int32, 1, "C"),
        nb.types.Array(nb.int32, 1, "C"),
        nb.types.Array(nb.float64, 1, "C"),
    )
)


@nb.njit(_PAIRS(_ro_i32, _ro_i64, _ro_f64, _ro_f64, nb.int64, nb.boolean, nb.boolean), **_JIT)
def _session_pairs(items, session, weight, decay, window, inverse, symmetric):
    n = items.size
    total = 0
    for d in range(1, window + 1):
        for i in range(n - d):
            if session[i + d] == session[i] and items[i + d] != items[i]:
                total += 1
    if symmetric:
        total *= 2
    src = np.empty(total, np.int32)
    dst = np.empty(total, np.int32)
    vals = np.empty(total, np.float64)
    at = 0
    for d in range(1, window + 1):
        for back in range(2 if symmetric else 1):
            for i in range(n - d):
                j = i + d
                if session[j] != session[i] or items[j] == items[i]:
                    continue
                dec = decay[j] if decay.size else 1.0
                if inverse:
                    dec = dec / d
                if back:
                    src[at], dst[at], vals[at] = items[j], items[i], weight[i] * dec
                else:
                    src[at], dst[at], vals[at] = items[i], items[j], weight[j] * dec
                at += 1
    return src, dst, vals


def session_pairs(
    items: npt.NDArray[np.int32],
    session: npt.NDArray[np.int64],
    weight: npt.NDArray[np.float64],
    decay: npt.NDArray[np.float64],
    window: int,
    inverse: bool,
    symmetric: bool,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.float64]]:
    """Every pair of events at most ``window`` apart in one session (different items), as
    ``(src, dst, value)``: value = dst event's weight x its ``decay`` (empty: 1) / d when
    ``inverse``; with ``symmetric`` each distance's pairs are followed by the same pairs the
    other way round, weighing the src event. The order is ``count_pairs_numpy``'s, so the sums
    that follow add in the same order."""
    return _session_pairs(items, session, weight, decay, window, inverse, symmetric)


# -- first-seen codes: Arrow's dictionary_encode indices, in less memory ------------------------


@nb.njit(inline="always", **_JIT)
def _hash(x, mask):
    h = np.uint64(x) * np.uint64(0x9E3779B97F4A7C15)
    return np.int64((h ^ (h >> np.uint64(29))) & np.uint64(mask))


@nb.njit(nb.types.Tuple((_i64, _i64))(_i64, _i64), **_JIT)
def _grown(keys, codes):
    cap = 2 * keys.shape[0]
    new_keys = np.empty(cap, np.int64)
    new_codes = np.full(cap, -1, np.int64)
    mask = cap - 1
    for s in range(keys.shape[0]):
        if codes[s] >= 0:
            t = _hash(keys[s], mask)
            while new_codes[t] >= 0:
                t = (t + 1) & mask
            new_keys[t] = keys[s]
            new_codes[t] = codes[s]
    return new_keys, new_codes


@nb.njit(
    nb.types.Tuple((_i64, _i64, nb.int64))(_ro_i64, _ro_bool, _i64, _i64, nb.int64, _i64),
    **_JIT,
)
def _first_seen(values, valid, keys, codes, n, out):
    checked = valid.shape[0] != 0
    mask = keys.shape[0] - 1
    for i in range(values.shape[0]):
        if checked and not valid[i]:
            out[i] = -1
            continue
        x = values[i]
        s = _hash(x, mask)
        while codes[s] >= 0 and keys[s] != x:
            s = (s + 1) & mask
        if codes[s] < 0:
            if 2 * (n + 1) > keys.shape[0]:
                keys, codes = _grown(keys, codes)
                mask = keys.shape[0] - 1
                s = _hash(x, mask)
                while codes[s] >= 0:
                    s = (s + 1) & mask
            keys[s] = x
            codes[s] = n
            n += 1
        out[i] = codes[s]
    return keys, codes, n


class FirstSeenCodes:
    """A code per int64 value, in order of first sight (0, 1, ...), over chunks fed in order;
    null (``valid`` False) -> -1. The indices ``pyarrow.compute.dictionary_encode`` gives, from
    a table of 16 bytes a distinct value (growing by doubling) instead of Arrow's hash table."""

    def __init__(self) -> None:
        self._keys = np.empty(1 << 16, np.int64)
        self._codes = np.full(1 << 16, -1, np.int64)
        self._n = 0

    def encode(
        self,
        values: npt.NDArray[np.int64],
        valid: npt.NDArray[np.bool_] | None,
        out: npt.NDArray[np.int64],
    ) -> None:
        """Write the codes of ``values`` (one chunk) into ``out`` (as long)."""
        mask = np.empty(0, np.bool_) if valid is None else np.ascontiguousarray(valid, np.bool_)
        self._keys, self._codes, self._n = _first_seen(
            np.ascontiguousarray(values, np.int64), mask, self._keys, self._codes, self._n, out
        )


# -- the log's (user, time) order -----------------------------------------------------------


@nb.njit(nb.types.Tuple((_i64, _i64))(_ro_i32, _ro_f64, nb.int64), **_JIT)
def _user_time_order(users, timestamps, n_users):
    starts = np.zeros(n_users + 1, np.int64)
    for u in users:
        starts[u + 1] += 1
    for u in range(n_users):
        starts[u + 1] += starts[u]
    order = np.empty(users.shape[0], np.int64)
    fill = starts[:-1].copy()
    for i in range(users.shape[0]):  # a stable counting sort by user
        u = users[i]
        order[fill[u]] = i
        fill[u] += 1
    for u in range(n_users):  # then each user's events by time, stably
        a, b = starts[u], starts[u + 1]
        ordered = True
        for j in range(a + 1, b):
            if timestamps[order[j]] < timestamps[order[j - 1]]:
                ordered = False
                break
        if not ordered:
            seg = order[a:b]
            order[a:b] = seg[np.argsort(timestamps[seg], kind="mergesort")]
    return order, starts


def user_time_order(
    users: npt.NDArray[np.int32], timestamps: npt.NDArray[np.float64], n_users: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``np.lexsort((timestamps, users))`` for dense user codes in ``[0, n_users)``, and where
    each user's events start in it (``n_users + 1`` offsets: the sorted users are a repeat of
    each code, no gather needed). A counting sort by user, then a stable sort of each user's
    events by time (none when they are in time order already, as logs usually are). O(n) beyond
    the per-user sorts, and only the order and the offsets are allocated; lexsort's two passes
    held about twice that."""
    order, starts = _user_time_order(
        np.ascontiguousarray(users, np.int32), np.ascontiguousarray(timestamps, np.float64), n_users
    )
    return order, starts
