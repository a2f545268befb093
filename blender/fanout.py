"""The deadline-aware blender: fan out to sources, keep what arrives in time, merge, filter.

Sources run on one bounded thread pool created with the blender (never per request). At the
deadline the blender merges what has arrived and abandons the rest: a late source never delays
the response. A raising source is reported and skipped (fail-open) unless it is ``required``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from blender.breaker import CircuitBreaker
from blender.filters import Exclusions
from blender.merge import SourceList, Strategy, merge, unify_id_dtypes
from retrieval.types import CandidateSet, Deadline, Request, SourceReport, SourceStatus, as_id_array
from sources.base import Ranked, SkipSource, Source

__all__ = ["NO_CLOCK_MS", "Blender", "RequiredSourceError", "SourceSlot"]

logger = logging.getLogger(__name__)

# A deadline that never comes in practice: offline work (evaluation, tuning) must not answer
# differently because the machine was busy.
NO_CLOCK_MS = 3_600_000.0


class RequiredSourceError(RuntimeError):
    """A source marked ``required`` failed, so the blend cannot be trusted."""

    def __init__(self, report: SourceReport) -> None:
        self.report = report
        super().__init__(
            f"required source {report.name!r} {report.status.value}"
            + (f": {report.error}" if report.error else "")
        )


@dataclass(slots=True)
class SourceSlot:
    """A source plus how the blend treats it."""

    source: Source
    timeout_ms: float | None = None
    weight: float = 1.0
    quota: int | None = None
    required: bool = False
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)

    @property
    def name(self) -> str:
        return self.source.name


@dataclass(slots=True)
class _Call:
    """One source's work for one request, timed inside the worker thread."""

    slot: SourceSlot
    deadline: Deadline
    future: cf.Future[_Outcome] | None = None
    report: SourceReport | None = None


@dataclass(slots=True)
class _Outcome:
    result: Ranked | None
    error: str | None
    skipped: bool
    latency_ms: float
    finished_at: float


def _run_source(source: Source, request: Request, k: int, deadline: Deadline) -> _Outcome:
    """Run one source; exceptions never escape into the pool."""
    t0 = time.monotonic()
    try:
        ids, scores = source.retrieve(request, k, deadline)
        ids = as_id_array(ids)
        scores = np.asarray(scores, dtype=np.float32)
        if ids.shape != scores.shape:
            raise ValueError(f"returned {ids.size} ids but {scores.size} scores")
        result: Ranked | None = (ids[:k], scores[:k])
        error, skipped = None, False
    except SkipSource as exc:
        result, error, skipped = None, str(exc) or "skipped", True
    except Exception as exc:  # fail-open: any source bug becomes a report, not an outage
        result, error, skipped = None, f"{type(exc).__name__}: {exc}", False
    t1 = time.monotonic()
    return _Outcome(result, error, skipped, (t1 - t0) * 1000, t1)


class Blender:
    def __init__(
        self,
        slots: Sequence[SourceSlot],
        *,
        k: int = 1000,
        deadline_ms: float = 50.0,
        strategy: Strategy = "rrf",
        rrf_k: float = 60.0,
        exclude_seen: bool = True,
        blocklist: npt.NDArray[Any] | None = None,
        fallback: str | None = None,
        workers: int | None = None,
        merge_reserve_ms: float = 1.0,
        curves: dict[str, npt.NDArray[np.float64]] | None = None,
    ) -> None:
        self.slots = list(slots)
        self.names = tuple(s.name for s in self.slots)
        self.k = k
        self.deadline_ms = deadline_ms
        self.strategy: Strategy = strategy
        self.rrf_k = rrf_k
        self.exclude_seen = exclude_seen
        self.blocklist = Exclusions(blocklist if blocklist is not None else [])
        self.fallback = None if fallback is None else self.names.index(fallback)
        self.merge_reserve_ms = merge_reserve_ms
        if strategy == "calibrated":
            missing = [n for n in self.names if not curves or n not in curves]
            if missing:
                raise ValueError(f"calibrated strategy: no rank curve for sources {missing}")
        self.curves = curves or {}
        self._pool = cf.ThreadPoolExecutor(
            max_workers=workers or max(4, 2 * len(self.slots) + 2),
            thread_name_prefix="blend",
        )

    # -- the public face -------------------------------------------------------------------

    def blend(self, request: Request, started: float | None = None) -> CandidateSet:
        """``started`` (monotonic) is when the caller's clock began: time it already spent,
        e.g. reading the store, comes out of this request's deadline."""
        started = time.monotonic() if started is None else started
        calls, k_ask, excl, k = self._start(request, started)
        pending = [c for c in calls if c.future is not None]
        arrived = threading.Event()
        for c in pending:
            assert c.future is not None
            c.future.add_done_callback(lambda _f: arrived.set())
        while True:
            now = time.monotonic()
            pending = [c for c in pending if not c.future.done() and c.deadline.at > now]  # type: ignore[union-attr]
            if not pending:
                break
            arrived.wait(max(c.deadline.at for c in pending) - now)
            arrived.clear()
        return self._finish(request, calls, k_ask, excl, k, started)

    async def ablend(self, request: Request, started: float | None = None) -> CandidateSet:
        started = time.monotonic() if started is None else started
        calls, k_ask, excl, k = self._start(request, started)
        pending = {asyncio.wrap_future(c.future): c for c in calls if c.future is not None}
        while pending:
            now = time.monotonic()
            wake = max(c.deadline.at for c in pending.values())
            if now >= wake:
                break
            done, _ = await asyncio.wait(
                list(pending), timeout=wake - now, return_when=asyncio.FIRST_COMPLETED
            )
            for fut in done:
                pending.pop(fut)
            self._drop_overdue(pending)
        return self._finish(request, calls, k_ask, excl, k, started)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        """Run side work (such as warm-up) on the blender's pool, not on a new thread."""
        return self._pool.submit(fn, *args)

    # -- steps -----------------------------------------------------------------------------

    def _start(self, request: Request, started: float) -> tuple[list[_Call], int, Exclusions, int]:
        k = request.k or self.k
        budget = request.deadline_ms or self.deadline_ms
        overall = Deadline(started + max(budget - self.merge_reserve_ms, 0.0) / 1000.0)
        seen = request.history if self.exclude_seen else ()
        excl = Exclusions(request.exclude, seen)
        k_ask = k + len(excl)
        calls = []
        for slot in self.slots:
            own = overall
            if slot.timeout_ms is not None:
                own = overall.earlier(Deadline(started + slot.timeout_ms / 1000.0))
            call = _Call(slot, own)
            calls.append(call)
            reason = slot.source.missing(request)
            if reason is not None:
                call.report = SourceReport(slot.name, SourceStatus.SKIPPED, error=reason)
            elif not slot.breaker.allow():
                call.report = SourceReport(
                    slot.name, SourceStatus.CIRCUIT_OPEN, error="circuit breaker open"
                )
            else:
                call.future = self._pool.submit(_run_source, slot.source, request, k_ask, own)
        return calls, k_ask, excl, k

    @staticmethod
    def _drop_overdue(pending: dict[Any, _Call]) -> None:
        """Stop waiting for sources whose own timeout has passed."""
        now = time.monotonic()
        for fut in [f for f, c in pending.items() if c.deadline.at <= now]:
            pending.pop(fut)

    def _finish(
        self,
        request: Request,
        calls: list[_Call],
        k_ask: int,
        excl: Exclusions,
        k: int,
        started: float,
    ) -> CandidateSet:
        results = [self._collect(call, started) for call in calls]
        lists = self._lists(results)
        for call in calls:
            assert call.report is not None
            if call.slot.required and call.report.status is not SourceStatus.OK:
                raise RequiredSourceError(call.report)

        budget = request.deadline_ms or self.deadline_ms
        item_ids, scores, ranks, backfilled = self._combine(
            request, results, lists, excl, k, k_ask, Deadline(started + budget / 1000.0)
        )
        reports = tuple(c.report for c in calls if c.report is not None)
        for j, rep in enumerate(reports):
            rep.survived = int(np.count_nonzero(ranks[:, j] >= 0)) if ranks.size else 0
        return CandidateSet(
            item_ids=item_ids,
            scores=scores,
            source_names=self.names,
            ranks=ranks,
            reports=reports,
            elapsed_ms=(time.monotonic() - started) * 1000,
            backfilled=backfilled,
        )

    def combine(
        self, request: Request, results: Sequence[Ranked | None]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32], npt.NDArray[np.int32], int]:
        """The blend's steps after the fan-out (merge, filters, backfill) on answers already in
        hand, one per source (None: it gave nothing), with no clock running.

        Offline evaluation scores exactly what serving would return from the same lists, so
        its recall does not depend on how busy the machine was (ids, scores, ranks, backfilled).
        """
        if len(results) != len(self.slots):
            raise ValueError(f"{len(results)} results for {len(self.slots)} sources")
        k = request.k or self.k
        excl = Exclusions(request.exclude, request.history if self.exclude_seen else ())
        k_ask = k + len(excl)
        # As deep as the fan-out would have asked: a longer offline list must not add ranks.
        cut = [None if r is None else (r[0][:k_ask], r[1][:k_ask]) for r in results]
        return self._combine(
            request, cut, self._lists(cut), excl, k, k_ask, Deadline.in_ms(NO_CLOCK_MS)
        )

    def _combine(
        self,
        request: Request,
        results: list[Ranked | None],
        lists: list[SourceList | None],
        excl: Exclusions,
        k: int,
        k_ask: int,
        overall: Deadline,
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32], npt.NDArray[np.int32], int]:
        merged = merge(lists, k, self.strategy, self.rrf_k, (self.blocklist, excl))
        item_ids, scores, ranks = merged.item_ids, merged.scores, merged.ranks
        if item_ids.size < k and self.fallback is not None:
            return self._backfill(
                request, overall, results, excl, k, k_ask, item_ids, scores, ranks
            )
        return item_ids, scores, ranks, 0

    def _lists(self, results: list[Ranked | None]) -> list[SourceList | None]:
        """Each source's answer as the merge sees it; exclusions are applied after dedupe."""
        present = [i for i, r in enumerate(results) if r is not None]
        lists: list[SourceList | None] = [None] * len(results)
        if not present:
            return lists
        ids_all = unify_id_dtypes([results[i][0] for i in present])  # type: ignore[index]
        for i, ids in zip(present, ids_all, strict=True):
            slot = self.slots[i]
            lists[i] = SourceList(
                ids=ids,
                scores=results[i][1],  # type: ignore[index]
                ranks=np.arange(ids.size, dtype=np.int32),
                weight=slot.weight,
                quota=slot.quota,
                curve=self.curves.get(slot.name),
            )
        return lists

    def _collect(self, call: _Call, started: float) -> Ranked | None:
        slot = call.slot
        if call.report is not None:  # skipped before it ran
            return None
        fut = call.future
        assert fut is not None
        outcome = fut.result() if fut.done() else None
        if outcome is None or outcome.finished_at > call.deadline.at:
            # Late is late even if it landed while we were collecting the others: the outcome
            # must not depend on how fast this thread got here.
            call.report = SourceReport(
                slot.name,
                SourceStatus.TIMEOUT,
                latency_ms=(call.deadline.at - started) * 1000,
                error=f"no answer within {(call.deadline.at - started) * 1000:.1f} ms",
            )
            slot.breaker.failure()
            return None
        result, error, latency = outcome.result, outcome.error, outcome.latency_ms
        if outcome.skipped:
            slot.breaker.release()
            call.report = SourceReport(slot.name, SourceStatus.SKIPPED, latency, error=error)
            return None
        if error is not None:
            slot.breaker.failure()
            call.report = SourceReport(slot.name, SourceStatus.ERROR, latency, error=error)
            logger.debug("source %s failed: %s", slot.name, error)
            return None
        assert result is not None
        slot.breaker.success()
        call.report = SourceReport(slot.name, SourceStatus.OK, latency, returned=result[0].size)
        return result

    def _usable(
        self, ids: npt.NDArray[Any], excl: Exclusions, current: npt.NDArray[Any]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
        """The fallback's ids (in the slate's id dtype) and which of them may be added."""
        keep = self.blocklist.mask(ids) & excl.mask(ids)
        if current.size:
            current, ids = unify_id_dtypes([current, ids])
            keep &= ~np.isin(ids, current)
        return ids, keep

    def _backfill(
        self,
        request: Request,
        overall: Deadline,
        results: list[Ranked | None],
        excl: Exclusions,
        k: int,
        k_ask: int,
        item_ids: npt.NDArray[Any],
        scores: npt.NDArray[np.float32],
        ranks: npt.NDArray[np.int32],
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32], npt.NDArray[np.int32], int]:
        """Top up a short slate from the fallback source, asking it for more if needed."""
        j = self.fallback
        assert j is not None
        slot = self.slots[j]
        result = results[j]
        need = k - item_ids.size
        if result is None:
            return item_ids, scores, ranks, 0  # a fallback that failed is not asked twice
        ids, keep, asked = *self._usable(result[0], excl, item_ids), k_ask
        # Exclusions may have eaten the fan-out answer: while the fallback's list was full and
        # time remains, ask it again four times deeper, on this thread.
        while int(keep.sum()) < need and result[0].size >= asked and not overall.expired():
            asked = 4 * max(asked, result[0].size)
            if asked > 64 * (k_ask + item_ids.size):
                break
            try:
                got = slot.source.retrieve(request, asked, overall)
            except Exception as exc:
                logger.debug("fallback %s failed during backfill: %s", slot.name, exc)
                break
            result = (as_id_array(got[0]), np.asarray(got[1], dtype=np.float32))
            ids, keep = self._usable(result[0], excl, item_ids)
        pos = np.arange(ids.size, dtype=np.int32)
        if item_ids.size and item_ids.dtype != ids.dtype:
            item_ids = unify_id_dtypes([item_ids, ids])[0]
        add = ids[keep][:need]
        if add.size == 0:
            return item_ids, scores, ranks, 0
        floor = float(scores.min()) if scores.size else 1.0
        add_scores = (floor - (np.arange(1, add.size + 1, dtype=np.float32) * 1e-6)).astype(
            np.float32
        )
        add_ranks = np.full((add.size, len(self.slots)), -1, dtype=np.int32)
        add_ranks[:, j] = pos[keep][:need]
        if not item_ids.size:
            item_ids = add[:0]
        return (
            np.concatenate([item_ids, add]),
            np.concatenate([scores, add_scores]),
            np.concatenate([ranks, add_ranks]),
            int(add.size),
        )
