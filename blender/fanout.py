"""The deadline-aware blender: one request path, as named steps over one context.

A blend is the steps of ``STEPS``, in that order, over one :class:`BlendContext` that
:meth:`Blender.context` makes per request: it refuses a request over the limits before any work,
and derives k, the budget and the deadlines once. ``blend`` and ``ablend`` run the same core
(``Blender._core``); they differ only in how they wait for the answers.

    prepare   the exclusions (each id checked by the one id rule), the depth each source is
              asked for (k plus what the exclusions may eat) and the filters merge and backfill
              apply: the static blocklist and the request's exclusions
    gate      per source: one that cannot serve the request is ``skipped``, one whose breaker
              is open ``circuit_open``
    fan_out   the others start on their own lanes; a full lane is ``shed``, never queued
    wait      until every answer is in or its deadline has passed (``blend`` blocks its thread;
              ``ablend`` awaits, then runs the steps after this one on the side lane)
    collect   each answer checked against the contract on the caller's thread (pairs, id rule,
              finite scores, repeats dropped, cut to the depth asked); late ones ``timeout`` or
              ``shed``, broken ones ``error``; the breakers told
    require   a ``required`` source that did not answer fails the blend
    lists     the answers as the merge sees them, in one id dtype
    merge     ``blender.merge.merge``, one vectorised pass: deduplicated across sources, the
              filters applied, blended by the strategy, cut to k
    backfill  a short slate topped up from the fallback, asked again deeper on its own lane,
              within the same deadline
    result    the CandidateSet, with how many of each source's candidates survived

Each source runs on its own lane of daemon threads, made once with the blender (never per
request), with a cap on its calls in flight: a hung source fills only its own lane, and its next
calls are ``shed``, not queued. At the deadline the blender merges what has arrived and abandons
the rest: a late source never delays the response. Every answer is checked at one boundary
(``checked_answer``); a source that raises or breaks the contract is reported as ``error`` for
that source alone (fail-open) unless it is ``required``. The circuit breaker counts only a
source's own failures: a call that started late (CPU contention, a slow store read before the
fan-out) and ran out of time is reported, but not held against it.

``combine`` runs the steps after the fan-out (lists, merge, backfill) on answers already in hand,
with no clock: offline evaluation scores what serving would return.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from blender.breaker import CircuitBreaker
from blender.filters import Exclusions
from blender.lanes import Arrivals, Lane
from blender.merge import Merged, SourceList, Strategy, merge, unify_id_dtypes
from retrieval import kernels
from retrieval.errors import InputError, RequestTooLarge, SourceError
from retrieval.ids import id_array, id_parts
from retrieval.types import CandidateSet, Deadline, Request, SourceReport, SourceStatus
from sources.base import Ranked, SkipSource, Source

__all__ = [
    "NO_CLOCK_MS",
    "STEPS",
    "BlendContext",
    "Blender",
    "RequestLimits",
    "RequiredSourceError",
    "SourceSlot",
    "checked_answer",
]

logger = logging.getLogger(__name__)

STEPS: tuple[str, ...] = (
    "prepare",
    "gate",
    "fan_out",
    "wait",
    "collect",
    "require",
    "lists",
    "merge",
    "backfill",
    "result",
)
"""The blend's steps in the order ``Blender._core`` runs them (the module's docstring says what
each does); each is the method of the same name with a leading underscore (``wait``: ``_wait``
for ``blend``, ``_await`` for ``ablend``)."""

# A deadline that never comes in practice: offline work (evaluation, tuning) must not answer
# differently because the machine was busy.
NO_CLOCK_MS = 3_600_000.0

# A call counts against the breaker only when it had at least this share of its time budget
# after it started: a source that began late because the machine or the store was slow did not
# fail on its own.
_FAIR_SHARE = 0.8

_NO_EXCLUSIONS = Exclusions()


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The most a request may carry; larger ones are refused before any source is asked, so one
    request's size cannot blow its own deadline or trip every breaker for everyone else."""

    max_exclude: int = 10_000
    max_seed_items: int = 1_000
    max_history: int = 1_000

    def check(self, request: Request) -> None:
        """Return quietly, or raise ``RequestTooLarge`` (an ``InputError``) naming the first
        field over its cap and the config key that sets it. Counts only: O(1)."""
        for field_name, n, cap in (
            ("exclude", len(request.exclude), self.max_exclude),
            ("seed_items", len(request.seed_items), self.max_seed_items),
            ("history", len(request.history), self.max_history),
        ):
            if n > cap:
                raise RequestTooLarge(
                    f"request.{field_name} holds {n} ids, more than limits.max_{field_name} = "
                    f"{cap}: send fewer, or raise the limit in the config"
                )


class RequiredSourceError(SourceError, RuntimeError):
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
    lane: Lane | None = None  # made by the Blender

    @property
    def name(self) -> str:
        """The source's configured name: the key of its report, its rank column and its lane."""
        return self.source.name


@dataclass(slots=True, eq=False)
class BlendContext:
    """One request on its way through the steps, made once by :meth:`Blender.context`.

    What every step needs is derived here once: k, the budget, the deadlines, and (by
    "prepare") the exclusions and the depth to ask. Each step then reads the fields of the
    steps before it and sets its own.
    """

    request: Request
    k: int
    budget_ms: float
    started: float
    """Monotonic: when the caller's clock began (time spent before, e.g. reading the store,
    comes out of the budget)."""
    deadline: Deadline
    """When collection stops: ``started`` + the budget - the merge reserve."""
    sources_started: float
    """When the sources' clocks began: their own timeouts and their fair share of the budget
    count from here (``started``, unless the caller read a store first)."""
    # prepare
    excl: Exclusions = _NO_EXCLUSIONS
    k_ask: int = 0
    filters: tuple[Exclusions, ...] = ()
    # gate, fan_out, collect
    calls: list[_Call] = field(default_factory=list)
    arrivals: Arrivals | None = None
    """How the started calls wake the caller: set by the driver (``run`` or ``arun``)."""
    results: list[Ranked | None] = field(default_factory=list)
    # lists, merge, backfill
    lists: list[SourceList | None] = field(default_factory=list)
    slate: Merged | None = None
    backfilled: int = 0

    def left_ms(self) -> float:
        """Time left before the caller's deadline (``started`` + the budget)."""
        return self.budget_ms - (time.monotonic() - self.started) * 1000.0


class Blender:
    """The fan-out and the merge over a fixed list of source slots; one per config, shared by
    every request thread.

    It owns one lane per source (``workers`` daemon threads each, made here, never per request;
    a full lane sheds the call) and a side lane for work off the request path. It uses the
    breaker each slot carries. A blend runs ``STEPS`` (prepare, gate, fan_out, wait, collect,
    require, lists, merge, backfill, result; the module docstring says what each does).

    ``blend``/``ablend`` never raise for a source's failure, which becomes that source's report;
    they raise only for the request (``RequestTooLarge``, ``InputError``/``IdError``) or a
    ``required`` source (``RequiredSourceError``). ``close`` stops the lanes; a blend after it
    raises ``RuntimeError``.
    """

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
        limits: RequestLimits | None = None,
    ) -> None:
        """``workers``: calls in flight per source (its lane's threads; default 32, above the
        callers' usual concurrency, so only a source that hoards calls is shed)."""
        if not 0 <= merge_reserve_ms < deadline_ms:
            raise InputError(
                f"merge_reserve_ms must be >= 0 and below deadline_ms ({deadline_ms}), "
                f"got {merge_reserve_ms}: no time would be left for the sources"
            )
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
        self.limits = limits or RequestLimits()
        if strategy == "calibrated":
            missing = [n for n in self.names if not curves or n not in curves]
            if missing:
                raise InputError(f"calibrated strategy: no rank curve for sources {missing}")
        self.curves = curves or {}
        cap = workers or 32
        for slot in self.slots:
            slot.lane = Lane(slot.name, cap)
        # The threads that run a blend's calls in turn when every core is busy (``_fan_out``).
        self._runners = Lane("turns", cap)
        self._blending = 0  # blends in ``run`` or ``arun`` now
        self._count_lock = threading.Lock()
        self._cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        # Side work (warm-up, cache writes, async store reads) queues here, never on a source's
        # lane, so it can neither be shed nor take a source's thread.
        self._side = Lane("side", max(2, cap))

    # -- the public face -------------------------------------------------------------------

    def context(self, request: Request, started: float | None = None) -> BlendContext:
        """The request's context; ``RequestTooLarge`` before any work when it is over the limits.

        ``started`` (monotonic) is when the caller's clock began: time it already spent, e.g.
        reading the store, comes out of this request's deadline.
        """
        self.limits.check(request)
        return self._context(request, started, request.deadline_ms or self.deadline_ms)

    def blend(self, request: Request, started: float | None = None) -> CandidateSet:
        """Up to k candidates by the deadline: the steps of ``STEPS`` on this thread."""
        return self.run(self.context(request, started))

    async def ablend(self, request: Request, started: float | None = None) -> CandidateSet:
        """``blend`` for asyncio: the loop is never blocked."""
        return await self.arun(self.context(request, started))

    def run(self, ctx: BlendContext) -> CandidateSet:
        """The steps over a context from ``context``, waiting on this thread."""
        ctx.arrivals = Arrivals()
        with self._in_flight():
            core = self._core(ctx)
            self._wait(next(core))
            return _rest(core)

    async def arun(self, ctx: BlendContext) -> CandidateSet:
        """``run`` for asyncio: the wait is awaited, and the steps after it (the merge; a
        backfill may wait on the fallback) run off the event loop, on the side lane."""
        loop = asyncio.get_running_loop()
        arrived = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(arrived.set)

        ctx.arrivals = Arrivals(wake=wake)
        with self._in_flight():
            core = self._core(ctx)
            await self._await(next(core), arrived)
            return await asyncio.wrap_future(self._side.submit(_rest, core))

    @contextlib.contextmanager
    def _in_flight(self) -> Generator[None, None, None]:
        """Counts the blends running now: with as many as cores, calls take turns."""
        with self._count_lock:
            self._blending += 1
        try:
            yield
        finally:
            with self._count_lock:
                self._blending -= 1

    def combine(
        self, request: Request, results: Sequence[Ranked | None]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.float32], npt.NDArray[np.int32], int]:
        """The blend's steps after the fan-out (lists, merge, backfill) on answers already in
        hand, one per source (None: it gave nothing), with no clock running.

        Offline evaluation scores exactly what serving would return from the same lists, so
        its recall does not depend on how busy the machine was (ids, scores, ranks, backfilled).
        """
        if len(results) != len(self.slots):
            raise InputError(f"{len(results)} results for {len(self.slots)} sources")
        ctx = self._context(request, None, NO_CLOCK_MS, reserve_ms=0.0)
        self._prepare(ctx)
        k_ask = ctx.k_ask
        # As deep as the fan-out would have asked: a longer offline list must not add ranks.
        ctx.results = [None if r is None else (r[0][:k_ask], r[1][:k_ask]) for r in results]
        self._lists(ctx)
        self._merge(ctx)
        self._backfill(ctx)
        slate = ctx.slate
        assert slate is not None
        return slate.item_ids, slate.scores, slate.ranks, ctx.backfilled

    def close(self, timeout_s: float = 5.0) -> list[str]:
        """Refuse new work and wait up to ``timeout_s`` for the calls in flight.

        Returns the names of sources still running a call afterwards: closing those would pull
        files or native indexes from under a live query, so the caller must leave them open.
        """
        end = time.monotonic() + timeout_s
        self._runners.close(0.0)  # a runner's calls are claimed on their lanes: waited below
        busy = [
            slot.name
            for slot in self.slots
            if slot.lane is not None and not slot.lane.close(end - time.monotonic())
        ]
        self._side.close(max(end - time.monotonic(), 0.0))
        return busy

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        """Run side work (such as a cache write) on the blender's side lane, not a new thread."""
        return self._side.submit(fn, *args)

    def submit_to(self, index: int, fn: Callable[..., Any], *args: Any) -> cf.Future[Any] | None:
        """Run work that calls source ``index`` (such as warm-up) on that source's lane, so
        ``close`` waits for it too; None when the lane is full."""
        lane = self.slots[index].lane
        assert lane is not None
        return lane.try_submit(fn, *args)

    # -- the core: the steps in order --------------------------------------------------------

    def _context(
        self,
        request: Request,
        started: float | None,
        budget_ms: float,
        reserve_ms: float | None = None,
    ) -> BlendContext:
        """k, the budget and the deadline, once; the other fields are the steps' to set."""
        started = time.monotonic() if started is None else started
        reserve_ms = self.merge_reserve_ms if reserve_ms is None else reserve_ms
        return BlendContext(
            request=request,
            k=request.k or self.k,
            budget_ms=budget_ms,
            started=started,
            deadline=Deadline(started + (budget_ms - reserve_ms) / 1000.0),
            sources_started=started,
        )

    def _core(self, ctx: BlendContext) -> Generator[BlendContext, None, CandidateSet]:
        """Every step of ``STEPS``, in order, for ``run`` and ``arun`` alike. It pauses once,
        at "wait", for its driver to wait for the answers its own way."""
        self._prepare(ctx)
        self._gate(ctx)
        self._fan_out(ctx)
        yield ctx  # wait
        self._collect(ctx)
        self._require(ctx)
        self._lists(ctx)
        self._merge(ctx)
        self._backfill(ctx)
        return self._result(ctx)

    def _prepare(self, ctx: BlendContext) -> None:
        """The exclusions, with every id the request carries checked by the one id rule first
        (``IdError`` names the field), so no source gets an id it would have to guess about;
        the depth to ask each source for; the filters merge and backfill apply."""
        request = ctx.request
        if request.seed_items:
            id_parts(request.seed_items, "request.seed_items", mixed=True)
        if not self.exclude_seen and request.history:
            request.history_ids  # noqa: B018 - checked once here, then shared by the sources
        ctx.excl = Exclusions(
            request.exclude,
            request.history if self.exclude_seen else (),
            names=("request.exclude", "request.history"),
        )
        ctx.k_ask = ctx.k + len(ctx.excl)
        ctx.filters = (self.blocklist, ctx.excl)

    def _gate(self, ctx: BlendContext) -> None:
        """One call per source, with its own deadline (its timeout counts from the sources'
        clock, never past the collection deadline); a source that cannot serve the request
        is skipped, one whose breaker is open is not asked."""
        calls = []
        for slot in self.slots:
            own = ctx.deadline
            if slot.timeout_ms is not None:
                own = own.earlier(Deadline(ctx.sources_started + slot.timeout_ms / 1000.0))
            call = _Call(slot, own)
            reason = slot.source.missing(ctx.request)
            if reason is not None:
                call.report = SourceReport(slot.name, SourceStatus.SKIPPED, error=reason)
            elif not slot.breaker.allow():
                call.report = SourceReport(
                    slot.name, SourceStatus.CIRCUIT_OPEN, error="circuit breaker open"
                )
            calls.append(call)
        ctx.calls = calls

    def _fan_out(self, ctx: BlendContext) -> None:
        """The calls the gate let through start, each asked for ``k_ask``; a source with
        ``workers`` calls already in flight is shed at once.

        With fewer blends in flight than cores, each call starts on its source's own lane, so
        the sources of one blend run side by side. With as many blends as cores, the calls take
        turns on one runner thread instead: the cores are busy anyway, and a thread hand-off per
        source, each a round trip on the GIL, would cost more than the overlap gains. Either
        way each call tells ``ctx.arrivals`` when it has answered, and a slow source in a turn
        costs the others at most a quarter of their time (``Arrivals``)."""
        arrivals = ctx.arrivals
        if arrivals is None:  # a context driven by hand: block on a lock, like ``run``
            arrivals = ctx.arrivals = Arrivals()
        claimed: list[int] = []
        for i, call in enumerate(ctx.calls):
            if call.report is not None:
                continue
            slot = call.slot
            assert slot.lane is not None
            try:
                call.started = slot.lane.try_claim()
            except RuntimeError:  # closing: give back the probes and claims taken so far
                for c in ctx.calls:
                    if c.started:
                        c.slot.lane.unclaim()  # type: ignore[union-attr]
                    if c.report is None:
                        c.slot.breaker.release()
                raise
            if call.started:
                arrivals.expect(i, call.deadline.at)
                claimed.append(i)
            else:
                slot.breaker.release()
                call.report = SourceReport(
                    slot.name, SourceStatus.SHED, error=f"{slot.lane.cap} calls already in flight"
                )
        if len(claimed) > 1 and self._blending >= self._cores:
            claimed.sort(key=lambda i: ctx.calls[i].deadline.at)
            arrivals.in_turn(claimed)
            args = (ctx.calls, ctx.request, ctx.k_ask, arrivals)
            try:
                started = self._runners.try_start(_run_in_turn, args, _nothing, None)
            except RuntimeError:  # closing: the calls are claimed, so their lanes still run them
                started = False
            if not started:
                self._start_on_lanes(ctx, arrivals.stalled(force=True))
        else:
            self._start_on_lanes(ctx, claimed)
        arrivals.fanned_out()

    @staticmethod
    def _start_on_lanes(ctx: BlendContext, tokens: list[int]) -> None:
        """Start these claimed calls each on its own source's lane."""
        assert ctx.arrivals is not None
        for i in tokens:
            call = ctx.calls[i]
            slot = call.slot
            assert slot.lane is not None
            slot.lane.start_claimed(
                _run_source,
                (slot.source, ctx.request, ctx.k_ask, call.deadline, call),
                _delivered,
                (call, ctx.arrivals, i),
            )

    def _wait(self, ctx: BlendContext) -> None:
        """Block until every call has answered or its own deadline has passed."""
        assert ctx.arrivals is not None
        ctx.arrivals.wait(lambda stalled: self._start_on_lanes(ctx, stalled))

    async def _await(self, ctx: BlendContext, arrived: asyncio.Event) -> None:
        """``_wait`` for asyncio: the same rule, without blocking the loop."""
        arrivals = ctx.arrivals
        assert arrivals is not None
        while (until := arrivals.until()) is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), until - time.monotonic())
            arrived.clear()
            if stalled := arrivals.stalled():
                self._start_on_lanes(ctx, stalled)

    def _collect(self, ctx: BlendContext) -> None:
        """Each call's answer, checked here on the caller's thread, or its report."""
        ctx.results = [self._answer(call, ctx) for call in ctx.calls]

    def _require(self, ctx: BlendContext) -> None:
        """A required source that did not answer fails the blend."""
        for call in ctx.calls:
            assert call.report is not None
            if call.slot.required and call.report.status is not SourceStatus.OK:
                raise RequiredSourceError(call.report)

    def _lists(self, ctx: BlendContext) -> None:
        """Each source's answer as the merge sees it (exclusions are applied after dedupe)."""
        results = ctx.results
        lists: list[SourceList | None] = [None] * len(results)
        present = [i for i, r in enumerate(results) if r is not None]
        if present:
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
        ctx.lists = lists

    def _merge(self, ctx: BlendContext) -> None:
        """Deduplicated across sources, filtered, blended, cut to k: one vectorised pass."""
        ctx.slate = merge(ctx.lists, ctx.k, self.strategy, self.rrf_k, ctx.filters)

    def _backfill(self, ctx: BlendContext) -> None:
        """Top up a short slate from the fallback source, asking it for more if needed."""
        slate, j = ctx.slate, self.fallback
        assert slate is not None
        item_ids, k, k_ask = slate.item_ids, ctx.k, ctx.k_ask
        if item_ids.size >= k or j is None:
            return
        result = ctx.results[j]
        if result is None:
            return  # a fallback that failed is not asked twice
        need = k - item_ids.size
        ids, keep, asked = *self._usable(result[0], ctx.filters, item_ids), k_ask
        # Exclusions may have eaten the fan-out answer: while the fallback's list was full and
        # time remains, ask it again four times deeper, within the same deadline.
        while int(keep.sum()) < need and result[0].size >= asked and not ctx.deadline.expired():
            asked = 4 * max(asked, result[0].size)
            if asked > 64 * (k_ask + item_ids.size):
                break
            deeper = self._ask_again(ctx.request, asked, ctx.deadline)
            if deeper is None:
                break
            result = deeper
            ids, keep = self._usable(result[0], ctx.filters, item_ids)
        pos = np.arange(ids.size, dtype=np.int32)
        if item_ids.size and item_ids.dtype != ids.dtype:
            item_ids = unify_id_dtypes([item_ids, ids])[0]
        add = ids[keep][:need]
        if add.size == 0:
            ctx.slate = Merged(item_ids, slate.scores, slate.ranks, slate.filtered)
            return
        scores = slate.scores
        floor = float(scores.min()) if scores.size else 1.0
        add_scores = (floor - (np.arange(1, add.size + 1, dtype=np.float32) * 1e-6)).astype(
            np.float32
        )
        add_ranks = np.full((add.size, len(self.slots)), -1, dtype=np.int32)
        add_ranks[:, j] = pos[keep][:need]
        if not item_ids.size:
            item_ids = add[:0]
        ctx.slate = Merged(
            np.concatenate([item_ids, add]),
            np.concatenate([scores, add_scores]),
            np.concatenate([slate.ranks, add_ranks]),
            slate.filtered,
        )
        ctx.backfilled = int(add.size)

    def _result(self, ctx: BlendContext) -> CandidateSet:
        """The slate with each source's report and how many of its candidates survived."""
        slate = ctx.slate
        assert slate is not None
        ranks = slate.ranks
        reports = tuple(c.report for c in ctx.calls if c.report is not None)
        survived = np.count_nonzero(ranks >= 0, axis=0).tolist() if ranks.size else []
        for j, rep in enumerate(reports):
            rep.survived = survived[j] if survived else 0
        return CandidateSet(
            item_ids=slate.item_ids,
            scores=slate.scores,
            source_names=self.names,
            ranks=ranks,
            reports=reports,
            elapsed_ms=(time.monotonic() - ctx.started) * 1000,
            backfilled=ctx.backfilled,
            filtered=slate.filtered,
        )

    # -- what the steps use ----------------------------------------------------------------

    def _answer(self, call: _Call, ctx: BlendContext) -> Ranked | None:
        """One call's checked answer, or None with its report (and its breaker) set."""
        slot = call.slot
        if call.report is not None:  # skipped, shed or circuit-open before it ran
            return None
        outcome = call.outcome if call.arrived else None
        if outcome is None or outcome.finished_at > call.deadline.at:
            # Late is late even if it landed while we were collecting the others: the outcome
            # must not depend on how fast this thread got here.
            call.report = self._late(call, ctx.sources_started)
            return None
        result, error, latency = outcome.result, outcome.error, outcome.latency_ms
        if outcome.skipped:
            slot.breaker.release()
            call.report = SourceReport(slot.name, SourceStatus.SKIPPED, latency, error=error)
            return None
        if error is None:
            try:
                result = checked_answer(result, ctx.k_ask)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        if error is not None:
            slot.breaker.failure()
            call.report = SourceReport(slot.name, SourceStatus.ERROR, latency, error=error)
            logger.debug("source %s failed: %s", slot.name, error)
            return None
        slot.breaker.success()
        call.report = SourceReport(slot.name, SourceStatus.OK, latency, returned=result[0].size)
        return result

    @staticmethod
    def _late(call: _Call, started: float) -> SourceReport:
        """No answer in time: ``shed`` if the source never started, else ``timeout``, held
        against its breaker only when it had a fair share of its budget."""
        slot = call.slot
        budget_s = call.deadline.at - started
        began = call.started_at
        if began is None:
            slot.breaker.release()
            return SourceReport(
                slot.name,
                SourceStatus.SHED,
                latency_ms=budget_s * 1000,
                error=f"could not start within {budget_s * 1000:.1f} ms",
            )
        if call.deadline.at - began >= _FAIR_SHARE * budget_s:
            slot.breaker.failure()
        else:
            slot.breaker.release()
        return SourceReport(
            slot.name,
            SourceStatus.TIMEOUT,
            latency_ms=budget_s * 1000,
            error=f"no answer within {budget_s * 1000:.1f} ms "
            f"(started after {(began - started) * 1000:.1f} ms)",
        )

    @staticmethod
    def _usable(
        ids: npt.NDArray[Any], filters: Sequence[Exclusions], current: npt.NDArray[Any]
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.bool_]]:
        """The fallback's ids (in the slate's id dtype) and which of them may be added."""
        keep = np.ones(ids.size, dtype=bool)
        for f in filters:
            keep &= f.mask(ids)
        if current.size:
            current, ids = unify_id_dtypes([current, ids])
            keep &= ~np.isin(ids, current)
        return ids, keep

    def _ask_again(self, request: Request, k: int, overall: Deadline) -> Ranked | None:
        """The fallback asked for a deeper list on its own lane, waited for only until
        ``overall``: None when it is busy, fails or is late."""
        assert self.fallback is not None
        slot = self.slots[self.fallback]
        assert slot.lane is not None
        try:
            fut = slot.lane.try_submit(_run_source, slot.source, request, k, overall)
        except RuntimeError:  # closing
            return None
        if fut is None:
            return None
        try:
            outcome = fut.result(timeout=max(overall.remaining_ms(), 0.0) / 1000.0)
        except cf.TimeoutError:
            return None
        if outcome is None or outcome.result is None or outcome.finished_at > overall.at:
            if outcome is not None and outcome.error:
                logger.debug("fallback %s failed during backfill: %s", slot.name, outcome.error)
            return None
        try:
            return checked_answer(outcome.result, k)
        except Exception as exc:
            logger.debug("fallback %s broke the contract during backfill: %s", slot.name, exc)
            return None


def _rest(core: Generator[BlendContext, None, CandidateSet]) -> CandidateSet:
    """Run a paused core to its end: the steps after "wait"."""
    try:
        next(core)
    except StopIteration as done:
        result: CandidateSet = done.value
        return result
    raise AssertionError("the blend's core pauses only once")


# -- the one boundary every source call and answer crosses ---------------------------------------


@dataclass(slots=True)
class _Call:
    """One source's work for one request, timed inside the worker thread."""

    slot: SourceSlot
    deadline: Deadline
    started: bool = False  # accepted by its lane (not shed)
    arrived: bool = False  # its worker is done with it (``outcome`` is final)
    outcome: _Outcome | None = None
    report: SourceReport | None = None
    started_at: float | None = None  # set by the worker when the source is called


@dataclass(slots=True)
class _Outcome:
    result: Any  # the source's raw answer, checked by ``checked_answer`` when collected
    error: str | None
    skipped: bool
    latency_ms: float
    finished_at: float


def _run_in_turn(calls: list[_Call], request: Request, k: int, arrivals: Arrivals) -> None:
    """A runner's job: the blend's queued calls, one after another, until none is left or the
    caller has taken the rest back (``Arrivals.stalled``)."""
    while (i := arrivals.next_turn()) is not None:
        call = calls[i]
        lane = call.slot.lane
        assert lane is not None
        try:
            outcome = _run_source(call.slot.source, request, k, call.deadline, call)
        finally:
            lane.unclaim()
        _delivered((call, arrivals, i), outcome, None)


def _nothing(_key: object, _result: object, _error: BaseException | None) -> None:
    """A runner delivers each call's answer itself."""


def _delivered(
    key: tuple[_Call, Arrivals, int], outcome: _Outcome | None, error: BaseException | None
) -> None:
    """A blend's call is back from its lane: its outcome is left on the call (None when it
    raised past ``_run_source``, which only a ``BaseException`` does), then the caller is told."""
    call, arrivals, token = key
    call.outcome = outcome
    call.arrived = True
    arrivals.arrive(token)


def _run_source(
    source: Source, request: Request, k: int, deadline: Deadline, call: _Call | None = None
) -> _Outcome | None:
    """Run one source; exceptions never escape into the lane. None: it was due to start after
    its deadline had passed, so it was not run at all."""
    t0 = time.monotonic()
    if t0 >= deadline.at:
        return None
    if call is not None:
        call.started_at = t0
    try:
        # Checked on the caller's thread ("collect"): four sources checking at once on their
        # own threads fight over the GIL and cost the blend three times as much.
        result: Any = source.retrieve(request, k, deadline)
        error, skipped = None, False
    except SkipSource as exc:
        result, error, skipped = None, str(exc) or "skipped", True
    except Exception as exc:  # fail-open: any source bug becomes a report, not an outage
        result, error, skipped = None, f"{type(exc).__name__}: {exc}", False
    t1 = time.monotonic()
    return _Outcome(result, error, skipped, (t1 - t0) * 1000, t1)


def checked_answer(answer: Any, k: int) -> Ranked:
    """A source's answer held to the contract, the one boundary every answer crosses.

    Two 1-D arrays of the same length; ids of one kind by the project's id rule (no uint64
    wrap-around, no floats, bools or None); scores finite; each id once, at its first (best)
    rank; at most ``k``. Anything else raises, and the blender reports ``error`` for that source
    alone.
    """
    try:
        raw_ids, raw_scores = answer
    except (TypeError, ValueError):
        raise SourceError(
            f"returned {type(answer).__name__}; expected a pair (ids, scores)"
        ) from None
    ids_in = raw_ids if isinstance(raw_ids, np.ndarray) else np.asarray(raw_ids, dtype=object)
    scores = np.asarray(raw_scores)
    if ids_in.ndim != 1 or scores.ndim != 1 or ids_in.shape != scores.shape:
        raise SourceError(
            f"returned ids of shape {ids_in.shape} and scores of shape {scores.shape}; "
            "expected two 1-D arrays of the same length"
        )
    ids = id_array(ids_in, "returned ids")
    if scores.dtype.kind not in "fiu":
        raise SourceError(f"returned scores of dtype {scores.dtype}; expected numbers")
    scores = scores.astype(np.float32, copy=False)
    if ids.dtype == np.int64:  # one compiled pass for both checks
        bad, repeats = kernels.check_ranked(ids, scores)
    else:
        finite = np.isfinite(scores)
        bad = -1 if finite.all() else int(np.flatnonzero(~finite)[0])
        repeats = ids.size > 1 and _has_repeats(ids)
    if bad >= 0:
        raise SourceError(f"returned a non-finite score ({scores[bad]}) at rank {bad}")
    if repeats:  # keep each id at its first (best) rank
        _, first = np.unique(ids, return_index=True)
        keep = np.sort(first)
        ids, scores = ids[keep], scores[keep]
    return ids[:k], scores[:k]


def _has_repeats(ids: npt.NDArray[Any]) -> bool:
    """For string ids (int ids are checked by ``kernels.check_ranked``): a plain sort, a third
    of ``np.unique``'s cost."""
    ordered = np.sort(ids)
    return bool((ordered[1:] == ordered[:-1]).any())
