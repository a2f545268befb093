"""Co-visitation: items seen together in sessions are each other's candidates.

Build: every pair of events at most ``window`` apart in one session adds a weight to (a, b).
Pairs are generated chunk by chunk (chunks end on session boundaries), summed per chunk, spilled
to disk partitioned by source-item range, and reduced one partition at a time to the top
``top_k`` neighbours per item, so memory stays bounded at 10M items and 100M events: all pairs
never exist at once. Serving sums the neighbour lists of the user's recent items.
"""

from __future__ import annotations

import itertools
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from pydantic import Field

from retrieval.artifacts import CSR, save_csr
from retrieval.types import DEFAULT_EVENT_WEIGHTS, event_weight_vector
from sources.base import Need, SourceParams, register
from sources.neighbours import NeighbourParams, NeighbourSource, concat_releasing, top_k_csr

if TYPE_CHECKING:
    from retrieval.offline.events import EventLog

__all__ = ["CovisitationParams", "CovisitationSource", "count_pairs", "count_pairs_numpy"]

# Pairs held in memory per partition while reducing; sets how many partitions a build spills to.
_PAIRS_PER_PARTITION = 60_000_000
_SPILLED = ("rows", "cols", "vals")  # one file each per partition and chunk


class CovisitationParams(NeighbourParams):
    """Items seen together in sessions. Every pair of events at most ``window`` apart in one
    session adds a weight to (a, b): b's event's ``weight`` column times
    ``event_weights[type]`` (unknown types 1), times ``1 / d`` for a pair ``d`` events apart
    (``distance_weight: inverse``), times ``2 ** (-age / half_life)`` when time decay is on,
    age measured from the log's last event. Each item keeps its ``top_k`` best neighbours.

    Serving sums the neighbour lists of the request's last ``history`` items and its seed
    items, each weighted by recency and event type; history items stay candidates (see
    ``self_weight``), seed items are never returned. When that finds fewer than k, a second
    hop (``expand_decay``) adds the neighbours of the best candidates.
    """

    window: int = Field(
        10,
        ge=1,
        le=1000,
        description="Largest distance, in events of one session, between the two events of a pair.",
    )
    distance_weight: Literal["constant", "inverse"] = Field(
        "inverse",
        description="`inverse`: a pair `d` events apart counts `1 / d`, the closer two views "
        "the more related (the 1/d of sequential rules in Ludewig & Jannach's session-based "
        "baselines, 2018); `constant`: every pair in the window counts 1.",
    )
    session_gap_s: float = Field(
        1800.0,
        gt=0,
        description="Without a `session_id` column, a user's events split into sessions "
        "wherever two are more than this many seconds apart (30 minutes, the usual web "
        "session timeout). Unused when the log has sessions.",
    )
    event_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS),
        description="Weight of each event type (unknown types weigh 1), times the log's weight "
        "column: a pair a -> b weighs b's event (a cart after a view counts more than a view "
        "after a cart); at serving, each history item's weight.",
    )
    time_decay_half_life_days: float | None = Field(
        None,
        gt=0,
        description="Half-life, in days, of a pair's weight by the age of its later event, "
        "measured from the log's last event; unset: no time decay.",
    )
    direction: Literal["symmetric", "forward"] = Field(
        "symmetric",
        description="`symmetric`: a pair counts both ways; `forward`: only from the earlier "
        "event's item to the later one's (\"what people went on to do after a\").",
    )
    top_k: int | None = Field(
        100,
        ge=1,
        description="Neighbours kept per item, best first; null: every neighbour.",
    )
    self_weight: float = Field(
        1.0,
        ge=0,
        description="A history item's own score: its weight x `self_weight` x its row's top "
        "score (an item is as close to itself as to its best neighbour; co-visitation counts "
        "no self pairs), on top of what the other history items' rows give it. 0: history items "
        "score only through the other items' rows.",
    )
    chunk_events: int = Field(
        2_000_000,
        ge=1,
        description="Events per pair-counting chunk of the build (a chunk never cuts a "
        "session): only trades build memory for passes, the neighbours stay the same.",
    )

    serving_params = NeighbourParams.serving_params | {"self_weight", "chunk_events"}


def _sessions(
    events: EventLog, gap_s: float
) -> tuple[npt.NDArray[np.intp] | None, npt.NDArray[np.int64]]:
    """An order in which sessions are contiguous and time-sorted (None: the log's own order),
    and a session number per event in that order.

    With a ``session_id`` column, sessions are (user, session_id); otherwise a user's events
    split wherever the gap exceeds ``gap_s``.
    """
    n = len(events)
    order: npt.NDArray[np.intp] | None = None
    users = events.users
    start = np.empty(n, dtype=bool)
    start[:1] = True
    if events.sessions is not None:
        sess = events.sessions
        if sess.size and int(sess.min()) >= 0 and int(sess.max()) < 2**32:
            # The log is sorted by (user, time): a stable sort on one packed (user, session) key
            # keeps time order inside sessions, several times faster than a three-key lexsort.
            key = (users.astype(np.int64) << 32) | sess
            order = np.argsort(key, kind="stable")
            del key
        else:
            order = np.lexsort((events.timestamps, sess, users))
        users, sess = users[order], sess[order]
        start[1:] = (users[1:] != users[:-1]) | (sess[1:] != sess[:-1])
        del users, sess
    else:
        start[1:] = (users[1:] != users[:-1]) | (np.diff(events.timestamps) > gap_s)
    session = np.cumsum(start, dtype=np.int64)
    session -= 1
    return order, session


def _partition_bounds(
    items: npt.NDArray[np.int32], n_items: int, n_parts: int
) -> npt.NDArray[np.int64]:
    """Item-range edges that give each partition about as many events (so as many pairs):
    popular items do not all land in one partition, whatever their ids."""
    cum = np.cumsum(np.bincount(items, minlength=n_items), dtype=np.int64)
    total = int(cum[-1]) if cum.size else 0
    targets = np.linspace(0, total, n_parts + 1)[1:-1]
    inner = np.minimum(np.searchsorted(cum, targets, side="left") + 1, n_items)
    return np.maximum.accumulate(np.r_[0, inner, n_items].astype(np.int64))


def _chunks(session: npt.NDArray[np.int64], size: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges of about ``size`` events that never cut a session."""
    n = session.size
    start = 0
    while start < n:
        stop = min(start + size, n)
        if stop < n:
            # Move the cut forward to the next session start.
            stop = int(np.searchsorted(session, session[stop - 1], side="right"))
        yield start, stop
        start = stop


def count_pairs(
    items: npt.NDArray[np.int32],
    session: npt.NDArray[np.int64],
    weight: npt.NDArray[np.float64],
    stamps: npt.NDArray[np.float64],
    n_items: int,
    params: CovisitationParams,
    t_max: float,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Summed pair weights for one chunk, as sorted packed keys ``a * n_items + b``.

    A pair a -> b weighs what happened to b (a cart after a view counts more than a view after
    a cart), times the time decay of b's event: simple to explain, and "forward" then reads as
    "what people went on to do after a". The pairs come from a compiled loop
    (``retrieval.build_kernels.session_pairs``); ``count_pairs_numpy`` is its reference.
    """
    from retrieval.build_kernels import session_pairs  # builds only: not at serving

    half_life = _half_life_s(params)
    decay = (
        np.empty(0, np.float64)
        if half_life is None
        else np.exp2(-(t_max - np.asarray(stamps, np.float64)) / half_life)
    )
    src, dst, vals = session_pairs(
        np.ascontiguousarray(items, np.int32),
        np.ascontiguousarray(session, np.int64),
        np.ascontiguousarray(weight, np.float64),
        decay,
        params.window,
        params.distance_weight == "inverse",
        params.direction == "symmetric",
    )
    return _packed_sums(src, dst, vals, n_items)


def count_pairs_numpy(
    items: npt.NDArray[np.int32],
    session: npt.NDArray[np.int64],
    weight: npt.NDArray[np.float64],
    stamps: npt.NDArray[np.float64],
    n_items: int,
    params: CovisitationParams,
    t_max: float,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """``count_pairs`` in numpy, one distance at a time: the reference the compiled loop is
    checked against (``tests/test_kernels.py``)."""
    src: list[npt.NDArray[np.int32]] = []
    dst: list[npt.NDArray[np.int32]] = []
    vals: list[npt.NDArray[np.float64]] = []
    half_life = _half_life_s(params)
    for d in range(1, params.window + 1):
        if d >= items.size:
            break
        i = np.flatnonzero((session[d:] == session[:-d]) & (items[d:] != items[:-d]))
        j = i + d
        decay = 1.0 if half_life is None else np.exp2(-(t_max - stamps[j]) / half_life)
        if params.distance_weight == "inverse":
            decay = decay / d
        src.append(items[i])
        dst.append(items[j])
        vals.append(weight[j] * decay)
        if params.direction == "symmetric":
            src.append(items[j])
            dst.append(items[i])
            vals.append(weight[i] * decay)
    if not src:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    return _packed_sums(np.concatenate(src), np.concatenate(dst), np.concatenate(vals), n_items)


def _half_life_s(params: CovisitationParams) -> float | None:
    days = params.time_decay_half_life_days
    return None if days is None else days * 86_400.0


def _packed_sums(
    src: npt.NDArray[np.int32],
    dst: npt.NDArray[np.int32],
    vals: npt.NDArray[np.float64],
    n_items: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    if not src.size:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    indptr, cols, summed = _sum_pairs(src, dst, vals, n_items, n_items)
    del src, dst, vals
    rows = np.repeat(np.arange(n_items, dtype=np.int64), np.diff(indptr))
    return rows * n_items + cols, summed


def _sum_pairs(
    rows: npt.NDArray[np.integer[Any]],
    cols: npt.NDArray[np.integer[Any]],
    vals: npt.NDArray[np.float64],
    n_rows: int,
    n_cols: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.float64]]:
    """Duplicate (row, col) pairs summed, as CSR arrays sorted by (row, col).

    scipy's COO -> CSR is a counting sort by row plus short per-row sorts: faster than one
    argsort of the packed keys, in less memory (benchmarks/README.md). Not the sum-by-id kernel
    (``sources.history.IdGroups``): this builds the sparse matrix the pairs are summed into.
    """
    m = sp.coo_matrix((vals, (rows, cols)), shape=(n_rows, n_cols)).tocsr()  # sums duplicates
    m.sort_indices()
    return (
        np.asarray(m.indptr, dtype=np.int64),
        np.asarray(m.indices, dtype=np.int32),
        np.asarray(m.data, dtype=np.float64),
    )


def build_covisitation(
    events: EventLog,
    params: CovisitationParams,
    spill_dir: Path,
    progress: Callable[[int], None] | None = None,
) -> tuple[CSR, dict[str, Any]]:
    """Each item's top co-visited items within sessions, as a CSR, and the build's counts."""
    n_items = len(events.item_ids)
    order, session = _sessions(events, params.session_gap_s)
    t_max = float(events.timestamps.max()) if len(events) else 0.0
    # Event times matter only to the time decay: without it they are not copied at all.
    stamps = events.timestamps if _half_life_s(params) is not None else np.empty(0, np.float64)
    items, weight = events.items, event_weight_vector(events, params.event_weights)
    if order is not None:
        items, weight = items[order], weight[order]
        stamps = stamps[order] if stamps.size else stamps
    del order  # 8 bytes an event: gone before the pairs are counted
    per_event = params.window * (2 if params.direction == "symmetric" else 1)
    n_parts = max(1, math.ceil(len(events) * per_event / _PAIRS_PER_PARTITION))
    bounds = _partition_bounds(items, n_items, n_parts)
    spill_dir.mkdir(parents=True, exist_ok=True)
    pairs_counted = 0
    n_chunks = 0
    try:
        for c, (lo, hi) in enumerate(_chunks(session, params.chunk_events)):
            keys, vals = count_pairs(
                items[lo:hi], session[lo:hi], weight[lo:hi], stamps[lo:hi], n_items, params, t_max
            )
            pairs_counted += int(keys.size)
            cuts = np.searchsorted(keys, bounds * n_items)
            for p in range(n_parts):
                a, b = cuts[p], cuts[p + 1]
                if b > a:
                    # Rows (from the partition's first item) and columns as int32: the reduce
                    # then sums them as they are, with no 8-byte division temporaries.
                    rows = (keys[a:b] // n_items - bounds[p]).astype(np.int32)
                    cols = (keys[a:b] % n_items).astype(np.int32)
                    for name, column in zip(_SPILLED, (rows, cols, vals[a:b]), strict=True):
                        np.save(spill_dir / f"p{p}-c{c}.{name}.npy", column)
            del keys, vals
            n_chunks = c + 1
            if progress is not None:
                progress(hi)
        indptr_parts, index_parts, score_parts = [], [], []
        for p in range(n_parts):
            files = sorted(spill_dir.glob(f"p{p}-c*.rows.npy"))
            n_rows = int(bounds[p + 1] - bounds[p])
            if files:
                spilled = [
                    [Path(str(f).replace(".rows.", f".{n}.")) for f in files] for n in _SPILLED
                ]
                rows, cols, vals = (np.concatenate([np.load(f) for f in fs]) for fs in spilled)
                for f in itertools.chain.from_iterable(spilled):
                    f.unlink()
                part_ptr, cols, vals = _sum_pairs(rows, cols, vals, n_rows, n_items)
                del rows
            else:
                part_ptr = np.zeros(n_rows + 1, np.int64)
                cols, vals = np.empty(0, np.int32), np.empty(0, np.float64)
            keep = n_items if params.top_k is None else params.top_k
            part = top_k_csr(part_ptr, cols, vals, keep)
            del cols, vals
            indptr_parts.append(part.indptr[1:])
            index_parts.append(part.indices)
            score_parts.append(part.scores)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)
    lengths = np.concatenate([np.diff(np.r_[0, ip]) for ip in indptr_parts])
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    csr = CSR(
        indptr,
        concat_releasing(index_parts, np.int32),
        concat_releasing(score_parts, np.float32),
    )
    stats = {
        "pairs_counted": pairs_counted,
        "nnz": csr.nnz,
        "items_with_neighbours": int(np.count_nonzero(lengths)),
        "sessions": int(session[-1] + 1) if session.size else 0,
        "chunks": n_chunks,
        "partitions": n_parts,
    }
    return csr, stats


@register("covisitation")
class CovisitationSource(NeighbourSource[CovisitationParams]):
    """Items seen near the history's items in the same sessions."""

    Params = CovisitationParams
    reads = frozenset({"event_type", "session_id", "weight"})
    needs = frozenset({Need.HISTORY})

    @classmethod
    def build(
        cls,
        events: EventLog,
        out_dir: Path,
        params: SourceParams,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Write the neighbour CSR under ``out_dir``; the counts go into the manifest."""
        assert isinstance(params, CovisitationParams)
        csr, stats = build_covisitation(events, params, out_dir / "_spill", progress)
        save_csr(out_dir, csr)
        return stats
