"""The public face: a Retriever loads a config once and serves ``blend()`` from many threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from blender.breaker import CircuitBreaker
from blender.calibration import CALIBRATION_FILE, Calibration
from blender.fanout import BlendContext, Blender, RequestLimits, SourceSlot
from blender.filters import load_blocklist
from retrieval.artifacts import check_built, open_artifacts, prefetch_page_cache, resolve_build
from retrieval.config import ConfigError, RetrievalConfig, arm_blend, load_config
from retrieval.errors import ClosedError, InputError
from retrieval.ids import check_id
from retrieval.metrics import MetricsSink
from retrieval.store import Event, MemoryStore, Store
from retrieval.store.cache import CacheFormatError, cache_key, decode_result, encode_result
from retrieval.types import MAX_K, CandidateSet, Deadline, ItemId, Request, SourceStatus, UserId
from sources.base import Need, Source, SourceContext, SourceParams

__all__ = ["SERVING_STEPS", "Retriever", "arm_point", "blend", "make_blender", "make_store"]

logger = logging.getLogger(__name__)

# The longest a new Retriever waits for its artifacts to be read into the page cache (10M
# items: ~7 GB; a cold start without it timed every source out).
_PREFETCH_WAIT_S = 120.0
_WARM_UP_BLENDS = 32

# Open retrievers holding the heap frozen (``_freeze_heap``); the last one to close thaws it.
_frozen = 0
_frozen_lock = threading.Lock()


def _freeze_heap() -> None:
    """Move every object alive after loading out of the collector's reach (``gc.freeze``).

    A full collection walks every tracked object with the whole process stopped: after numba's,
    faiss's and pyarrow's imports that is ~140k objects and 72-79 ms on a quiet machine here
    (benchmarks/README.md), longer than the deadline of every request in flight. Like the BLAS
    limit, this is process-wide while a retriever is open: garbage is collected first, and
    ``close`` of the last open retriever gives the collector everything back.
    """
    global _frozen
    with _frozen_lock:
        gc.collect()
        gc.freeze()
        _frozen += 1


def _thaw_heap() -> None:
    global _frozen
    with _frozen_lock:
        _frozen -= 1
        if _frozen == 0:
            gc.unfreeze()


SERVING_STEPS: tuple[str, ...] = (
    "request",
    "gate",
    "prepare",
    "cache_get",
    "blend",
    "finish",
    "cache_put",
)
"""A served blend's steps, in order; each is the ``Retriever`` method of the same name with a
leading underscore (``request``: ``_as_request``; ``blend``: the blender's own ``STEPS``).

    request    the typed keywords (or a Request) as one checked Request
    gate       the blender's context: a request over the limits is refused before the store is
               read; k, the budget and the deadlines are derived once, here
    prepare    the one store read (history, live popular lists), within the time left
    cache_get  a cached result for the same request, when the cache is on (a hit skips to finish)
    blend      the blender's steps (``blender.fanout.STEPS``); the sources' clocks start here
    finish     the store's status and the elapsed time on the caller's clock
    cache_put  a complete answer written to the cache off the request path

``blend`` and ``ablend`` run one core (``Retriever._serve``): it yields each step that waits (the
store and cache reads, the blend) and its driver runs that step, ``blend`` in place and
``ablend`` off the event loop.
"""


class Retriever:
    """Loads every source once; ``blend`` is thread-safe and allocates little per call."""

    def __init__(
        self,
        config: RetrievalConfig,
        *,
        store: Store | None = None,
        metrics: MetricsSink | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        # One BLAS thread per call: the lanes already run sources in parallel, and implicit's
        # users' most common performance complaint is BLAS threads oversubscribing the cores.
        # The limit is process-wide, so ``close`` gives the host its own setting back.
        self._blas_limit = threadpool_limits(limits=1, user_api="blas")
        # A store passed in is the caller's to close (``retrieval serve`` keeps one store across
        # reloads); the one made here is closed with the retriever.
        self._owns_store = store is None
        self.store: Store = store if store is not None else make_store(config)
        artifacts = config.resolve_path(config.artifacts) if config.artifacts else None
        if artifacts is not None:
            # Resolved once: every file comes from one build, however often one is published.
            artifacts = resolve_build(artifacts)
        self.build: Path | None = artifacts  # what it serves, links resolved once
        _check_needs(config, artifacts)
        manifest_stamp = ""
        if artifacts is not None:
            manifest_stamp = _check_artifacts(config, artifacts)
            # In the background while the sources load; waited for before the warm-up.
            prefetch = threading.Thread(
                target=prefetch_page_cache, args=(artifacts,), name="prefetch", daemon=True
            )
            prefetch.start()
        # The result cache's version: a new build or a config change never serves old results.
        config_json = config.model_dump_json(exclude={"store": {"url"}})
        self._version = hashlib.blake2b(
            f"{manifest_stamp}|{config_json}".encode(), digest_size=8
        ).hexdigest()
        self._cache_ttl_s = config.store.cache_ttl_s
        self._remote_rows = any(_backend(sc.resolved_params) == "redis" for sc in config.sources)
        context = SourceContext(artifacts=artifacts, store=self.store, config_dir=config.base_dir)
        self.sources: list[Source] = []
        try:
            for sc in config.sources:
                self.sources.append(sc.source_class(sc.name, sc.resolved_params, context))
        except Exception:
            self.close()
            raise
        self._blender = make_blender(config, self.sources, _load_curves(config, artifacts))
        self._arms = _make_arms(config, self.sources, self._blender, artifacts)
        self._closed = False
        if artifacts is not None:
            prefetch.join(timeout=_PREFETCH_WAIT_S)
        _freeze_heap()
        self._holds_freeze = True
        self._warm_up()
        self._warm_up_blends(artifacts)

    @property
    def blender(self) -> Blender:
        """The fan-out and merge; ``blender.combine`` re-merges answers already in hand."""
        return self._blender

    def _warm_up(self, budget_s: float = 2.0) -> None:
        """Touch every source once so the first real request does not pay for lazy imports,
        first page faults of memory-mapped files and allocator growth (and time out).

        Runs on the fan-out pool with a bounded wait, so a hanging source cannot hang startup.
        """
        probe = Request(user_id="__warm_up__", history=("__warm_up__",), k=1)

        def touch(src: Source) -> None:
            # A source that cannot serve the probe will say so, with a reason, at request time.
            with contextlib.suppress(Exception):
                src.retrieve(probe, 1, Deadline.in_ms(budget_s * 1000))

        futures = [self._blender.submit_to(i, touch, src) for i, src in enumerate(self.sources)]
        concurrent.futures.wait([f for f in futures if f is not None], timeout=budget_s)

    def _warm_up_blends(self, artifacts: Path | None, budget_s: float = 1.0) -> None:
        """A few whole blends over real catalogue items, so the first request's code paths
        (first-call set-up in numpy, faiss and the kernels' dispatch, the lanes' threads) are
        paid here: with per-source touches alone the first request took 2-3x the p99.

        Every other blend is a known user of the build with logged history (timestamps, event
        types), the rest anonymous with fresh history: the first real requests take either path
        (the ANN source's user factors or its re-solved vector), and a path a real request took
        first made it slower than the p99 (benchmarks/README.md).

        Straight through the blender (no store read, no cache write), with the config's own
        deadline, for at most ``budget_s``; the breakers then forget these outcomes.
        """
        ids = None if artifacts is None else artifacts / "ids"
        if ids is None or not (ids / "items.npy").is_file():
            return
        with contextlib.suppress(Exception):
            items = np.load(ids / "items.npy", mmap_mode="r")
            users_path = ids / "users.npy"
            users = np.load(users_path, mmap_mode="r") if users_path.is_file() else items[:0]
            n = int(items.shape[0])
            if n == 0:
                return
            end = time.monotonic() + budget_s
            for i in range(_WARM_UP_BLENDS):
                if time.monotonic() >= end:
                    break
                picks = np.linspace(0, n - 1, 10 + i).astype(np.int64)[i % 3 :: 3]
                history = tuple(items[picks].tolist())
                logged = i % 2 == 1 and users.shape[0] > 0
                request = Request(
                    user_id=users[i * 7919 % users.shape[0]].item() if logged else None,
                    history=history,
                    history_timestamps=(0.0,) * len(history) if logged else None,
                    history_event_types=("warm_up",) * len(history),
                )
                with contextlib.suppress(Exception):
                    self._blender.blend(request)
        for slot in self._blender.slots:
            slot.breaker.reset()

    @classmethod
    def from_yaml(
        cls,
        path: str | Path,
        *,
        store: Store | None = None,
        metrics: MetricsSink | None = None,
    ) -> Retriever:
        """A retriever for the YAML config at ``path`` (relative paths in it resolve against
        its directory); ``ConfigError`` names each problem with its key. Pass ``store`` to
        share one store between retrievers instead of the config's own (you close it), and
        ``metrics`` to record every served blend (``retrieval.metrics``)."""
        return cls(load_config(path), store=store, metrics=metrics)

    # -- serving: the request path, as named steps (``SERVING_STEPS``) ----------------------

    def blend(
        self,
        request: Request | None = None,
        *,
        user_id: UserId | None = None,
        history: Sequence[ItemId] | None = None,
        seed_items: Sequence[ItemId] | None = None,
        context: Mapping[str, str] | None = None,
        exclude: Iterable[ItemId] | None = None,
        k: int | None = None,
        deadline_ms: float | None = None,
        vector: npt.ArrayLike | None = None,
    ) -> CandidateSet:
        """Up to k deduplicated candidates within the deadline, whatever the sources and the
        store do. Pass a ``Request`` or its fields as keywords, not both; a keyword of the
        wrong type raises ``InputError`` naming it."""
        started = time.monotonic()
        request = _as_request(
            request, user_id, history, seed_items, context, exclude, k, deadline_ms, vector
        )
        return self._run(self._serve(request, started))

    async def ablend(
        self,
        request: Request | None = None,
        *,
        user_id: UserId | None = None,
        history: Sequence[ItemId] | None = None,
        seed_items: Sequence[ItemId] | None = None,
        context: Mapping[str, str] | None = None,
        exclude: Iterable[ItemId] | None = None,
        k: int | None = None,
        deadline_ms: float | None = None,
        vector: npt.ArrayLike | None = None,
    ) -> CandidateSet:
        """The asyncio twin of ``blend``: the store read and the sources run on the pool, so
        the loop is never blocked."""
        started = time.monotonic()
        request = _as_request(
            request, user_id, history, seed_items, context, exclude, k, deadline_ms, vector
        )
        return await self._arun(self._serve(request, started))

    def request(
        self,
        request: Request | None = None,
        *,
        user_id: UserId | None = None,
        history: Sequence[ItemId] | None = None,
        seed_items: Sequence[ItemId] | None = None,
        context: Mapping[str, str] | None = None,
        exclude: Iterable[ItemId] | None = None,
        k: int | None = None,
        deadline_ms: float | None = None,
        vector: npt.ArrayLike | None = None,
    ) -> Request:
        """The request ``blend`` will serve: the store fills in history the caller left out,
        and the live popular lists the sources will read."""
        request = _as_request(
            request, user_id, history, seed_items, context, exclude, k, deadline_ms, vector
        )
        ctx = self._gate(request, time.monotonic()).ctx
        self._prepare(ctx)
        return ctx.request

    def _serve(
        self, request: Request, started: float
    ) -> Generator[_Io | _Blend, Any, CandidateSet]:
        """The steps of ``SERVING_STEPS`` after "request", in order, for ``blend`` and
        ``ablend`` alike: each step that waits is yielded for the driver to run."""
        run = self._gate(request, started)
        ctx = run.ctx
        failures = self._store_failures()
        read_ok: bool = yield _Io(self._prepare, ctx)
        key = self._cache_key(ctx)
        if key is not None:
            hit: CandidateSet | None = yield _Io(self._cache_get, key, run)
            if hit is not None:
                return self._finish(hit, read_ok, run)
        # The sources' clocks start now, after the store reads, so a slow store read is the
        # store's fault (``degraded``), never a source's timeout nor a failure its breaker
        # counts. The deadline stays the caller's, so the blend still ends when it says.
        ctx.sources_started = time.monotonic()
        result: CandidateSet = yield run
        read_ok = read_ok and self._store_failures() == failures
        result = self._finish(result, read_ok, run)
        if key is not None:
            self._cache_put(key, result)
        return result

    def _gate(self, request: Request, started: float) -> _Blend:
        """The arm's blender and its context for ``request``, refused before any store read
        when it is over the limits (a 100k-id exclude list would otherwise ask the store for
        100k popular items first), or when the retriever is closed."""
        if self._closed:
            raise ClosedError("this Retriever is closed: make a new one to serve again")
        arm = self.arm_of(request.user_id)
        return _Blend(arm, arm.blender.context(request, started))

    def arm_of(self, user_id: UserId | None) -> _Arm:
        """The A/B arm that serves ``user_id``: a stable hash of the id and the experiment's
        salt, so a user keeps their arm across requests, workers and restarts (the first arm
        serves requests without a user id)."""
        arms = self._arms
        if len(arms) == 1 or user_id is None:
            return arms[0]
        point = arm_point(self.config.experiment.salt, user_id)
        for arm in arms:
            if point < arm.upto:
                return arm
        return arms[-1]

    def _prepare(self, ctx: BlendContext) -> bool:
        """All the store reads this blend needs, in ONE ``fetch`` bounded by the time left
        before the deadline minus a reserve for the sources; never raises. Fills in the
        context's request and returns whether the read succeeded."""
        request = ctx.request
        store_cfg = self.config.store
        want_history = request.user_id is not None and not request.history
        want_history = want_history and store_cfg.history_len > 0
        segments: dict[str | None, None] = {}
        depth = 0
        for src in self.sources:
            segs, n = src.live_popular(request, ctx.k + len(request.exclude))
            if n > 0:
                segments.update(dict.fromkeys(segs))
                depth = max(depth, n)
        if not want_history and not segments:
            return True
        try:
            read = self.store.fetch(
                request.user_id if want_history else None,
                list(segments),
                popular_limit=depth if segments else 0,
                timeout_ms=self._read_budget_ms(ctx),
            )
        except Exception:  # a custom store's bug must not fail the blend either
            logger.warning("store fetch failed; blending without it", exc_info=True)
            ctx.request = dataclasses.replace(request, live_popular={})
            return False
        changes: dict[str, Any] = {"live_popular": read.popular}
        if read.items:
            keep = -self.config.limits.max_history  # the newest; history is oldest first
            changes.update(
                history=tuple(read.items[keep:]),
                history_timestamps=tuple(read.timestamps[keep:]),
                history_event_types=tuple(read.event_types[keep:]),
            )
        ctx.request = dataclasses.replace(request, **changes)
        return read.ok

    def _read_budget_ms(self, ctx: BlendContext) -> float:
        """A store read may use the time left before the deadline minus a reserve for the
        sources (at most half of what is left), and never more than the socket timeout."""
        sc = self.config.store
        left_ms = ctx.left_ms()
        return min(sc.socket_timeout_ms, left_ms - min(sc.read_reserve_ms, left_ms / 2))

    def _cache_key(self, ctx: BlendContext) -> str | None:
        if self._cache_ttl_s <= 0:
            return None
        return cache_key(ctx.request, ctx.k, self._version)

    def _cache_get(self, key: str, run: _Blend) -> CandidateSet | None:
        blob = self.store.cache_get(key, timeout_ms=self._read_budget_ms(run.ctx))
        if blob is None:
            return None
        try:
            hit = decode_result(blob)
        except CacheFormatError as exc:
            logger.debug("unreadable cached result %s: %s", key, exc)
            return None
        if hit.source_names != run.arm.blender.names:
            return None
        hit.cache_hit = True
        return hit

    def _finish(self, result: CandidateSet, read_ok: bool, run: _Blend) -> CandidateSet:
        result.store_status = "ok" if read_ok else "degraded"
        result.elapsed_ms = (time.monotonic() - run.ctx.started) * 1000.0
        result.arm = run.arm.name
        if self.metrics is not None:
            try:
                self.metrics.observe(result)
            except Exception:  # a sink's bug must not fail the blend
                logger.warning("metrics sink failed; result served anyway", exc_info=True)
        return result

    def _store_failures(self) -> int:
        """The store's count of failed reads: sources reading pushed rows run on other threads,
        so a blend compares it before and after (another request's failure in the meantime can
        mark this one degraded too; a failure of its own is never missed)."""
        return int(getattr(self.store, "failures", 0)) if self._remote_rows else 0

    def _cache_put(self, key: str, result: CandidateSet) -> None:
        """Cache complete answers only, written off the request path (on the pool)."""
        if result.store_status != "ok":
            return
        if any(r.status not in (SourceStatus.OK, SourceStatus.SKIPPED) for r in result.reports):
            return
        blob = encode_result(result)
        ttl = self._cache_ttl_s
        timeout = self.config.store.socket_timeout_ms
        with contextlib.suppress(RuntimeError):  # the pool is closing
            self._blender.submit(lambda: self.store.cache_set(key, blob, ttl, timeout_ms=timeout))

    def _run(self, core: Generator[_Io | _Blend, Any, CandidateSet]) -> CandidateSet:
        """Drive the core on this thread: each step that waits runs in place."""
        value: Any = None
        while True:
            try:
                step = core.send(value)
            except StopIteration as done:
                result: CandidateSet = done.value
                return result
            if isinstance(step, _Blend):
                value = step.arm.blender.run(step.ctx)
            else:
                value = step.fn(*step.args)

    async def _arun(self, core: Generator[_Io | _Blend, Any, CandidateSet]) -> CandidateSet:
        """Drive the core on the event loop: each step that waits runs off it."""
        value: Any = None
        while True:
            try:
                step = core.send(value)
            except StopIteration as done:
                result: CandidateSet = done.value
                return result
            if isinstance(step, _Blend):
                value = await step.arm.blender.arun(step.ctx)
            else:
                value = await asyncio.wrap_future(self._blender.submit(step.fn, *step.args))

    # -- live events -----------------------------------------------------------------------

    def record(
        self,
        user_id: UserId,
        item_id: ItemId,
        timestamp: float | None = None,
        event_type: str = "click",
        context: Mapping[str, str] | None = None,
    ) -> None:
        """Append a live event to the user's history and the popularity counters."""
        ts = time.time() if timestamp is None else float(timestamp)
        self.store.record([Event(user_id, item_id, ts, event_type, context)])

    def record_many(self, events: Iterable[Event]) -> None:
        """Record a batch in one store write (one round trip on Redis), not one per event.

        The whole batch is checked first: a bad event raises ``InputError`` (``IdError`` for an
        id) naming its index and field, ``events[3].item_id``, and nothing of the batch is
        written. ``StoreError`` (``StoreUnavailable``) when the store cannot keep the events.
        """
        self.store.record(list(events))

    # -- lifecycle -------------------------------------------------------------------------

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking requests, wait up to ``timeout_s`` for the source calls in flight, then
        release the sources and the store.

        A source still running a call after that (a hung query) is left open and logged: closing
        it would unmap files or free a native index under that call and crash the process.
        """
        if getattr(self, "_closed", False):
            return
        self._closed = True
        blenders = [a.blender for a in getattr(self, "_arms", ())]
        base = getattr(self, "_blender", None)
        if base is not None and base not in blenders:
            blenders.append(base)
        busy: set[str] = set()
        for blender in blenders:
            busy.update(blender.close(timeout_s))
        for src in self.sources:
            if src.name in busy:
                logger.warning(
                    "source %s still has a call running after %.1f s: left open",
                    src.name,
                    timeout_s,
                )
                continue
            src.close()
        if self._owns_store:
            self.store.close()
        limit = getattr(self, "_blas_limit", None)
        if limit is not None:
            limit.restore_original_limits()
        if getattr(self, "_holds_freeze", False):
            self._holds_freeze = False
            _thaw_heap()

    async def aclose(self) -> None:
        """``close`` for ``async`` code. It runs on the loop's thread, so it may block the loop
        for up to ``close``'s wait for the source calls in flight."""
        self.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_blender(
    config: RetrievalConfig,
    sources: Sequence[Source],
    curves: dict[str, npt.NDArray[np.float64]] | None = None,
) -> Blender:
    """The blender a config describes, over sources already loaded (one per configured source,
    in order): the retriever's, and offline evaluation's for re-merging answers in hand."""
    slots = [
        SourceSlot(
            source=src,
            timeout_ms=sc.timeout_ms,
            weight=sc.weight,
            quota=sc.quota,
            required=sc.required,
            breaker=CircuitBreaker(config.breaker.failures, config.breaker.cooldown_s),
        )
        for src, sc in zip(sources, config.sources, strict=True)
    ]
    blocklist = None
    if config.blend.blocklist is not None:
        blocklist = load_blocklist(config.resolve_path(config.blend.blocklist))
    return Blender(
        slots,
        k=config.k,
        deadline_ms=config.deadline_ms,
        strategy=config.blend.strategy,
        rrf_k=config.blend.rrf_k,
        exclude_seen=config.blend.exclude_seen,
        blocklist=blocklist,
        fallback=config.blend.fallback,
        workers=config.blend.workers,
        merge_reserve_ms=config.blend.merge_reserve_ms,
        curves=curves,
        limits=RequestLimits(
            max_exclude=config.limits.max_exclude,
            max_seed_items=config.limits.max_seed_items,
            max_history=config.limits.max_history,
        ),
    )


def make_store(config: RetrievalConfig) -> Store:
    """The store a config describes (embedded or Redis), for a caller that shares one store
    between retrievers (``Retriever(config, store=...)``)."""
    sc = config.store
    if sc.kind == "memory":
        return MemoryStore(
            history_len=sc.history_len,
            half_life_s=sc.half_life_s,
            history_ttl_s=sc.history_ttl_s,
            event_weights=dict(config.events.weights),
        )
    try:
        from retrieval.store.redis_store import RedisStore
    except ImportError as exc:
        raise ConfigError(
            config.origin,
            [
                (
                    "store.kind",
                    f"redis needs the redis client ({exc.name} is missing): "
                    "pip install 'candidate-retrieval[redis]'",
                )
            ],
        ) from None
    assert sc.url is not None  # the config check guarantees it
    try:
        return RedisStore(
            sc.url,
            prefix=sc.prefix,
            history_len=sc.history_len,
            history_ttl_s=sc.history_ttl_s,
            half_life_s=sc.half_life_s,
            socket_timeout_ms=sc.socket_timeout_ms,
            buffer_events=sc.buffer_events,
            event_weights=dict(config.events.weights),
        )
    except ValueError as exc:  # a malformed URL; the message is already redacted
        raise ConfigError(config.origin, [("store.url", str(exc))]) from None


def _backend(params: SourceParams) -> str:
    return str(getattr(params, "backend", "local"))


def _check_needs(config: RetrievalConfig, artifacts: Path | None) -> None:
    """Fail at load, not on the first request, when a source cannot possibly work."""
    problems = []
    for i, sc in enumerate(config.sources):
        needs = sc.source_class.needs
        remote = _backend(sc.resolved_params) == "redis"
        if remote and config.store.kind != "redis":
            problems.append(
                (f"sources[{i}].params.backend", "redis needs store.kind: redis (and its url)")
            )
        elif remote:
            continue
        if (Need.ARTIFACTS in needs or sc.source_class.learns()) and artifacts is None:
            problems.append(
                (
                    f"sources[{i}]",
                    f"kind {sc.kind!r} serves from built artifacts: set 'artifacts:' to the "
                    "output of `retrieval build`",
                )
            )
    if problems:
        raise ConfigError(config.origin, problems)


def _load_curves(
    config: RetrievalConfig, artifacts: Path | None
) -> dict[str, npt.NDArray[np.float64]] | None:
    if config.blend.strategy != "calibrated":
        return None
    if config.blend.calibration is not None:
        path = config.resolve_path(config.blend.calibration)
    else:
        assert artifacts is not None  # the config check guarantees one of the two
        path = artifacts / CALIBRATION_FILE
    names = [s.name for s in config.sources]
    calibration = Calibration.load(path, names)
    depth = config.k + config.store.history_len + 1
    return {n: calibration.curves[n].dense(depth) for n in names}


def _check_artifacts(config: RetrievalConfig, artifacts: Path) -> str:
    """Refuse a build of another format or made for other params, before touching its files.

    Returns the build's id (empty when nothing local is served), which versions the result
    cache."""
    learning = [
        sc
        for sc in config.sources
        if sc.source_class.learns() and _backend(sc.resolved_params) != "redis"
    ]
    if not learning:
        return ""
    manifest = open_artifacts(artifacts)
    for sc in learning:
        check_built(manifest, sc)
    return manifest.build_id


_cache_lock = threading.Lock()
_cache: dict[Path, tuple[tuple[int, int], Retriever]] = {}
# How long a replaced retriever stays open for the blends already running on it.
_RETIRE_AFTER_S = 30.0


def blend(
    config: str | Path | Retriever,
    request: Request | None = None,
    *,
    user_id: UserId | None = None,
    history: Sequence[ItemId] | None = None,
    seed_items: Sequence[ItemId] | None = None,
    context: Mapping[str, str] | None = None,
    exclude: Iterable[ItemId] | None = None,
    k: int | None = None,
    deadline_ms: float | None = None,
    vector: npt.ArrayLike | None = None,
) -> CandidateSet:
    """One call for the simple case: the retriever for ``config`` is loaded once and reused,
    and loaded again when the file changes. The arguments are ``Retriever.blend``'s."""
    request = _as_request(
        request, user_id, history, seed_items, context, exclude, k, deadline_ms, vector
    )
    retriever = config if isinstance(config, Retriever) else _retriever_for(config)
    return retriever.blend(request)


def _retriever_for(config: str | Path) -> Retriever:
    path = Path(config).resolve()
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    with _cache_lock:
        cached = _cache.get(path)
        if cached is None or cached[0] != stamp:
            retriever = Retriever.from_yaml(path)
            _cache[path] = (stamp, retriever)
            if cached is not None:
                timer = threading.Timer(_RETIRE_AFTER_S, cached[1].close)
                timer.daemon = True
                timer.start()
        else:
            retriever = cached[1]
    return retriever


# -- the typed facade: the caller's arguments as one checked Request ----------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Arm:
    """An A/B arm: its name (None without an experiment), its blender, and the top of its
    slice of [0, 1) (``arm_point`` below it and above the previous arm's picks it)."""

    name: str | None
    blender: Blender
    upto: float


class _Blend:
    """The blend step of one request: the arm's blender and the request's context."""

    __slots__ = ("arm", "ctx")

    def __init__(self, arm: _Arm, ctx: BlendContext) -> None:
        self.arm = arm
        self.ctx = ctx


def arm_point(salt: str, user_id: UserId) -> float:
    """Where ``user_id`` falls in [0, 1) for the experiment salted ``salt``: stable across
    processes and versions (blake2b, not Python's randomised ``hash``); 123 and "123" agree."""
    digest = hashlib.blake2b(f"{salt}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _make_arms(
    config: RetrievalConfig,
    sources: Sequence[Source],
    base: Blender,
    artifacts: Path | None,
) -> tuple[_Arm, ...]:
    """One blender per arm over the sources already loaded (an arm without overrides serves
    on the base blender); without an experiment, the base blender alone."""
    arms = config.experiment.arms
    if not arms:
        return (_Arm(None, base, 1.0),)
    out: list[_Arm] = []
    upto = 0.0
    for arm in arms:
        upto += arm.share
        if arm.sources is None and not arm.blend:
            out.append(_Arm(arm.name, base, upto))
            continue
        keep = [
            i
            for i, sc in enumerate(config.sources)
            if arm.sources is None or sc.name in arm.sources
        ]
        arm_config = config.model_copy(
            update={
                "blend": arm_blend(config, arm),
                "sources": [config.sources[i] for i in keep],
            }
        )
        arm_sources = [sources[i] for i in keep]
        blender = make_blender(arm_config, arm_sources, _load_curves(arm_config, artifacts))
        out.append(_Arm(arm.name, blender, upto))
    return tuple(out)


class _Io:
    """A serving step that waits on the store: ``blend`` runs it in place, ``ablend`` on the
    blender's side lane."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn = fn
        self.args = args


def _as_request(
    request: Request | None,
    user_id: UserId | None,
    history: Sequence[ItemId] | None,
    seed_items: Sequence[ItemId] | None,
    context: Mapping[str, str] | None,
    exclude: Iterable[ItemId] | None,
    k: int | None,
    deadline_ms: float | None,
    vector: npt.ArrayLike | None,
) -> Request:
    """The request to serve: ``request`` as given, or one made of the keywords; each argument
    of the wrong type raises ``InputError`` naming it (``k=True`` or ``k="many"`` is not a k)."""
    if request is not None:
        given = [
            name
            for name, value in (
                ("user_id", user_id),
                ("history", history),
                ("seed_items", seed_items),
                ("context", context),
                ("exclude", exclude),
                ("k", k),
                ("deadline_ms", deadline_ms),
                ("vector", vector),
            )
            if value is not None
        ]
        if given:
            raise InputError(
                "pass a Request or its fields as keywords, not both: got request and "
                + ", ".join(f"{name}=" for name in given)
            )
        if not isinstance(request, Request):
            raise InputError(
                f"request must be a retrieval.Request, got {type(request).__name__}; "
                "pass the fields as keywords instead"
            )
        _check_k(request.k, "request.k")
        _check_deadline_ms(request.deadline_ms, "request.deadline_ms")
        return request
    return Request(
        user_id=None if user_id is None else check_id(user_id, "user_id"),
        history=_item_ids(history, "history"),
        seed_items=_item_ids(seed_items, "seed_items"),
        context=_context(context),
        exclude=frozenset(_item_ids(exclude, "exclude")),
        k=_check_k(k, "k"),
        deadline_ms=_check_deadline_ms(deadline_ms, "deadline_ms"),
        vector=_vector(vector),
    )


def _check_k(k: object, name: str) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool | np.bool_) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise InputError(
            f"{name} must be an int from 1 to {MAX_K:,}, got {k!r} ({type(k).__name__})"
        )
    return int(k)


def _check_deadline_ms(deadline_ms: object, name: str) -> float | None:
    if deadline_ms is None:
        return None
    if isinstance(deadline_ms, bool | np.bool_) or not isinstance(
        deadline_ms, int | float | np.integer | np.floating
    ):
        raise InputError(
            f"{name} must be a positive number of milliseconds, got {deadline_ms!r} "
            f"({type(deadline_ms).__name__})"
        )
    ms = float(deadline_ms)
    if not (math.isfinite(ms) and ms > 0):
        raise InputError(f"{name} must be a positive finite number of milliseconds, got {ms}")
    return ms


def _item_ids(ids: Iterable[ItemId] | None, name: str) -> tuple[ItemId, ...]:
    """The ids as a tuple (each is checked by the one id rule when the blend prepares)."""
    if ids is None:
        return ()
    if isinstance(ids, str | bytes):
        raise InputError(f"{name} must be a list of item ids, got a {type(ids).__name__}")
    try:
        return tuple(ids)
    except TypeError:
        raise InputError(f"{name} must be a list of item ids, got {type(ids).__name__}") from None


def _context(context: Mapping[str, str] | None) -> dict[str, str]:
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise InputError(f"context must be a mapping of str to str, got {type(context).__name__}")
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InputError(
                f"context must map str to str, got context[{key!r}] = {value!r} "
                f"({type(key).__name__} -> {type(value).__name__})"
            )
    return dict(context)


def _vector(vector: npt.ArrayLike | None) -> npt.NDArray[np.float32] | None:
    if vector is None:
        return None
    try:
        return np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"vector must be an array of numbers: {exc}") from None
