"""Popular items, globally and per segment: the fallback that backfills blends, serves cold users.

Offline, each event adds its weight (event-type weight times the log's own weight column) to its
item, decayed by age relative to the log's newest event (``mode: decayed``), or compared between
a recent window and a longer baseline (``mode: trending``). The top ``top_n`` items are kept per
list as one CSR: row 0 is the global list, then one row per value of each segment column.

Online, serving is a slice of one row, so this source stays fast and never fails for an unknown
user. Live counts recorded since the build are folded in from ``request.live_popular``, which the
retriever fills in its one store round trip: this source never reads the store itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field

from retrieval.artifacts import (
    CSR,
    REBUILD,
    ArtifactError,
    IdMap,
    load_csr,
    read_json_object,
    read_versioned_json,
    save_csr,
    source_root,
)
from retrieval.errors import InputError
from retrieval.types import (
    DEFAULT_EVENT_WEIGHTS,
    Deadline,
    Request,
    as_id_array,
    event_weight_vector,
)
from sources.base import Ranked, Source, SourceContext, SourceParams, register
from sources.history import IdGroups, sum_by_id, top_k_order

if TYPE_CHECKING:
    from retrieval.offline.events import EventLog

__all__ = ["PopularityParams", "PopularitySource"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_DAY_S = 86_400.0


class PopularityParams(SourceParams):
    """Popular items: the fallback that backfills blends and serves cold users. The build ranks
    every item by its weighted event count, time-decayed (``mode: decayed``) or rising against
    a baseline (``mode: trending``), and keeps the best ``top_n`` per list: one global list and
    one per value of each ``segments`` column.

    A request gets the list of the first segment whose value its ``context`` holds (and the
    build saw), else the global list; a segment list shorter than k is topped up from the global
    one, scored below it. Live counts (events recorded with ``record()``, in the store's
    decayed popularity counters) are added to it with ``live_weight``: the retriever reads them
    in its one store round trip, so this source never reads the store itself. An unknown user
    gets the same lists: this source never fails for one.
    """

    half_life_days: float = Field(
        7.0,
        gt=0,
        description="`decayed`: an event's weight halves every this many days of age, measured "
        "from the log's newest event. Unused by `trending`.",
    )
    event_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS),
        description="Weight of each event type (unknown types weigh 1), times the log's weight "
        "column: what an event adds to its item's count.",
    )
    segments: list[str] = Field(
        default_factory=list,
        description="Segment columns of the event log (e.g. `country`; the build fails on "
        "one the log lacks) that get a list per value, besides the global list. A request "
        "uses the first whose value is in its `context`.",
    )
    mode: Literal["decayed", "trending"] = Field(
        "decayed",
        description="`decayed`: time-decayed weighted counts (`half_life_days`); `trending`: "
        "the count of the last `trending_window_days` against the one the `baseline_days` "
        "before it predict, `(recent + m) / (expected + m)` with m = `trending_smoothing`; "
        "items with no recent event are left out.",
    )
    trending_window_days: float = Field(
        1.0,
        gt=0,
        description="`trending`: the recent window, in days back from the log's newest event.",
    )
    baseline_days: float = Field(
        14.0,
        gt=0,
        description="`trending`: days before the window whose rate gives each item's expected "
        "count for the window.",
    )
    trending_smoothing: float = Field(
        5.0,
        gt=0,
        description="`trending`: pseudo-events added to both the recent and the expected count, "
        'so that 1 against 0 is not "infinitely rising"; larger values favour items with more '
        "recent events.",
    )
    top_n: int = Field(
        10_000,
        ge=1,
        description="Items kept per list (the global one and each segment value's), best first.",
    )
    live_weight: float = Field(
        1.0,
        ge=0,
        description="Factor on the live counts before they are added to the build's scores; 0: "
        "the build alone. In `trending` mode build scores are ratios, not counts: lower it "
        "accordingly. Only serving reads it, but it stays in the build's hash so older builds "
        "still match.",
    )
    live_top: int = Field(
        100,
        ge=0,
        description="Live items folded in per list: the top this many of the served list's "
        "live counts (at most k); 0: none.",
    )

    serving_params = frozenset({"live_top"})  # live_weight stays hashed: older builds match


def _aggregate(
    keys: npt.NDArray[np.integer[Any]], n_keys: int, values: list[npt.NDArray[np.float64]]
) -> tuple[npt.NDArray[np.int64], list[npt.NDArray[np.float64]]]:
    """Sum each value array per key; keys come back sorted, with any event.

    One vectorised pass of the sum-by-id kernel (``IdGroups``: a dense count when the keys are
    few next to the events, else one sort of the keys that occur).
    """
    groups = IdGroups(keys, n_ids=n_keys)
    return groups.ids.astype(np.int64, copy=False), [groups.sum(v) for v in values]


def _segment_keys(
    codes: npt.NDArray[np.integer[Any]], n_values: int, items: npt.NDArray[np.int32], n_items: int
) -> npt.NDArray[np.int64]:
    """``value x n_items + item`` per event, built in place; events without a value (code < 0)
    key into an extra row ``n_values`` that the caller drops.

    Keying them aside instead of filtering the events first keeps the per-event value arrays
    uncopied: at 100M events each copy was 800 MB. Sums stay bit-identical: each key still adds
    its own events in log order.
    """
    keys = codes.astype(np.int64)
    keys[keys < 0] = n_values
    keys *= n_items
    keys += items
    return keys


def _top_rows(
    keys: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float64],
    n_rows: int,
    n_items: int,
    top_n: int,
) -> CSR:
    """Keep each row's ``top_n`` best items (positive scores only), best first, as a CSR."""
    keep = scores > 0
    keys, scores = keys[keep], scores[keep]
    row = keys // n_items
    order = np.lexsort((-scores, row))  # by row, then best first; ties by item id (keys sorted)
    row_sorted = row[order]
    starts = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=n_rows))])
    rank = np.arange(order.size) - starts[row_sorted]
    order = order[rank < top_n]
    kept_rows = row[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(kept_rows, minlength=n_rows))])
    return CSR(
        indptr=indptr.astype(np.int64),
        indices=(keys[order] % n_items).astype(np.int32),
        scores=scores[order].astype(np.float32),
    )


def _scores(p: PopularityParams, sums: list[npt.NDArray[np.float64]]) -> npt.NDArray[np.float64]:
    if p.mode == "decayed":
        return sums[0]
    # Recent count vs the count the baseline rate predicts for the window, both padded with
    # ``trending_smoothing`` pseudo-events so that 1 vs 0 is not "infinitely rising".
    expected = sums[1] * (p.trending_window_days / p.baseline_days)
    m = p.trending_smoothing
    return np.where(sums[0] > 0, (sums[0] + m) / (expected + m), 0.0)


@register("popularity")
class PopularitySource(Source[PopularityParams]):
    """Serves one precomputed list per request: the first segment in ``params.segments`` whose
    value is in ``request.context`` and was seen at build time, else the global list.

    A segment list shorter than ``k`` is backfilled from the global list (scored below it), and
    the top ``live_top`` live counts of that list's key (``"<segment>=<value>"`` or ``None``) in
    ``request.live_popular`` are added with ``live_weight``. In ``trending`` mode build scores are
    ratios, not counts: lower ``live_weight`` accordingly.
    """

    Params = PopularityParams
    reads = frozenset({"event_type", "weight", "segments"})

    def __init__(self, name: str, params: PopularityParams, context: SourceContext) -> None:
        super().__init__(name, params, context)
        if context.artifacts is None:
            raise ArtifactError(f"source {name!r} (popularity) needs built artifacts; run a build")
        # Resolved once and checked (stamp, checksums, id maps) before anything is read.
        root = source_root(Path(context.artifacts), name)
        self.dir = root / name
        meta = read_versioned_json(self.dir / "popularity.json", FORMAT_VERSION, "popularity meta")
        segments = read_json_object(self.dir / "segments.json", "popularity segment rows")
        self.csr = load_csr(self.dir, mmap=True)
        self.item_ids = IdMap.load(root / "ids" / "items.npy", mmap=True)
        try:
            self.segment_rows: dict[str, dict[str, int]] = {
                str(seg): {str(v): int(r) for v, r in values.items()}
                for seg, values in segments.items()
            }
        except (AttributeError, TypeError, ValueError):
            raise ArtifactError(
                f"{self.dir / 'segments.json'}: expected {{segment: {{value: row}}}}; {REBUILD}"
            ) from None
        self.meta = meta

    def _pick_row(self, context: Mapping[str, str]) -> tuple[int, str | None]:
        for seg in self.params.segments:
            value = context.get(seg)
            if value is None:
                continue
            row = self.segment_rows.get(seg, {}).get(str(value))
            if row is not None:
                return row, f"{seg}={value}"
        return 0, None

    def _slice(self, row: int, n: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
        a, b = int(self.csr.indptr[row]), int(self.csr.indptr[row + 1])
        b = min(b, a + n)
        return np.asarray(self.csr.indices[a:b]), np.asarray(self.csr.scores[a:b])

    def live_popular(self, request: Request, k: int) -> tuple[Sequence[str | None], int]:
        """The one live list this request's segment reads, and how deep: the retriever fetches it
        in its single store round trip."""
        if self.params.live_weight == 0 or self.params.live_top == 0:
            return (), 0
        return (self._pick_row(request.context)[1],), min(k, self.params.live_top)

    def _live(
        self, request: Request, key: str | None, k: int
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
        """The prefetched live list for ``key``: empty when the store was not (or could not be)
        read, so a store outage serves the build."""
        empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))
        if request.live_popular is None or self.params.live_weight == 0:
            return empty
        ids, scores = request.live_popular.get(key) or ((), ())
        n = min(k, self.params.live_top, len(ids), len(scores))
        if n == 0:
            return empty
        try:
            return as_id_array(list(ids[:n])), np.asarray(
                scores[:n], dtype=np.float64
            ) * self.params.live_weight
        except (TypeError, ValueError):
            logger.debug("%s: unusable live list for %r; serving build counts", self.name, key)
            return empty

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        """The built list of the request's segment (the global one when the segment has too few),
        with the live counts folded in by ``live_weight``."""
        row, key = self._pick_row(request.context)
        live_ids, live_scores = self._live(request, key, k)
        n = k + live_ids.size
        dense, scores = self._slice(row, n)
        if row != 0 and dense.size < n:
            g_dense, g_scores = self._slice(0, n + dense.size)
            fresh = ~np.isin(g_dense, dense)
            g_dense, g_scores = g_dense[fresh][: n - dense.size], g_scores[fresh][: n - dense.size]
            if dense.size and g_scores.size:  # strictly below the segment list, same order
                g_scores = g_scores * np.float32(0.5 * scores[-1] / g_scores[0])
            dense = np.concatenate([dense, g_dense])
            scores = np.concatenate([scores, g_scores])
        ids = self.item_ids.to_external(dense)
        if live_ids.size == 0:
            return ids[:k], scores[:k].astype(np.float32, copy=False)
        if ids.size and live_ids.dtype.kind != ids.dtype.kind:
            logger.debug(
                "%s: live ids are %s, built ids %s; ignoring live",
                self.name,
                live_ids.dtype,
                ids.dtype,
            )
            return ids[:k], scores[:k].astype(np.float32, copy=False)
        all_ids = np.concatenate([ids, live_ids]) if ids.size else live_ids
        all_scores = np.concatenate([scores.astype(np.float64), live_scores])
        uniq, total = sum_by_id(all_ids, all_scores)
        order = top_k_order(total, uniq, k)
        return uniq[order], total[order].astype(np.float32)

    @classmethod
    def build(
        cls,
        events: EventLog,
        out_dir: Path,
        params: SourceParams,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Count, decay and rank: a few vectorised passes over the log, one per segment column."""
        if not isinstance(params, PopularityParams):
            raise TypeError(f"expected PopularityParams, got {type(params).__name__}")
        p = params
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        missing = [s for s in p.segments if s not in events.segments]
        if missing:
            raise InputError(
                f"popularity segments {missing} are not columns of the event log; "
                f"available: {sorted(events.segments) or 'none'}"
            )
        n_items = len(events.item_ids)
        n_events = int(events.items.shape[0])
        ts = np.asarray(events.timestamps, dtype=np.float64)
        t_max = float(ts.max()) if n_events else 0.0
        age = np.subtract(t_max, ts)
        del ts
        w = event_weight_vector(events, p.event_weights)
        # In place: each per-event temporary is 800 MB at 100M events. Same bits as
        # ``w * exp2(-age / half_life)``: negation is exact and products commute.
        if p.mode == "decayed":
            np.negative(age, out=age)
            np.divide(age, p.half_life_days * _DAY_S, out=age)
            np.exp2(age, out=age)
            np.multiply(w, age, out=age)
            values = [age]
        else:
            window, baseline = p.trending_window_days * _DAY_S, p.baseline_days * _DAY_S
            recent = age < window
            base = ~recent & (age < window + baseline)
            del age
            values = [np.where(recent, w, 0.0), np.where(base, w, 0.0)]
            del recent, base
        del w
        items = np.asarray(events.items)
        # One pass per list family (global, then each segment column), each ranked on its own:
        # concatenating every family's events first held several copies of a 100M-event log.
        families: list[tuple[npt.NDArray[np.int64] | None, int]] = [(None, 1)]
        mapping: dict[str, dict[str, int]] = {}
        n_rows = 1
        for seg in p.segments:
            seg_values = np.asarray(events.segment_values[seg])
            families.append((np.asarray(events.segments[seg]), int(seg_values.shape[0])))
            mapping[seg] = {str(v): n_rows + i for i, v in enumerate(seg_values.tolist())}
            n_rows += int(seg_values.shape[0])
        parts = []
        for codes, n in families:
            if codes is None:  # the global list: the item is the key
                keys, sums = _aggregate(items, n_items, values)
            else:
                keys, sums = _aggregate(
                    _segment_keys(codes, n, items, n_items), (n + 1) * n_items, values
                )
                cut = int(np.searchsorted(keys, n * n_items))  # drop the events without a value
                keys, sums = keys[:cut], [s[:cut] for s in sums]
            parts.append(_top_rows(keys, _scores(p, sums), n, n_items, p.top_n))
            del keys, sums
        lengths = np.concatenate([np.diff(part.indptr) for part in parts])
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        csr = CSR(
            indptr=indptr,
            indices=np.concatenate([part.indices for part in parts]),
            scores=np.concatenate([part.scores for part in parts]),
        )
        save_csr(out_dir, csr)
        (out_dir / "segments.json").write_text(json.dumps(mapping))
        meta = {
            "format_version": FORMAT_VERSION,
            "mode": p.mode,
            "max_timestamp": t_max,
            "n_items": n_items,
            "n_rows": n_rows,
        }
        (out_dir / "popularity.json").write_text(json.dumps(meta))
        if progress is not None:
            progress(n_events)
        return {
            **meta,
            "nnz": int(csr.indices.shape[0]),
            "segments": {s: len(v) for s, v in mapping.items()},
        }
