"""The public face: a Retriever loads a config once and serves ``blend()`` from many threads."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from blender.breaker import CircuitBreaker
from blender.calibration import CALIBRATION_FILE, Calibration
from blender.fanout import Blender, SourceSlot
from blender.filters import load_blocklist
from retrieval.artifacts import check_source, open_artifacts, params_hash
from retrieval.build import build_params_hash_input
from retrieval.config import ConfigError, RetrievalConfig, load_config
from retrieval.store import Event, MemoryStore, Store
from retrieval.types import CandidateSet, Deadline, ItemId, Request, UserId
from sources.base import Need, Source, SourceContext

__all__ = ["Retriever", "blend"]


class Retriever:
    """Loads every source once; ``blend`` is thread-safe and allocates little per call."""

    def __init__(self, config: RetrievalConfig, *, store: Store | None = None) -> None:
        self.config = config
        # One BLAS thread per call: the pool already runs sources in parallel, and implicit's
        # users' most common performance complaint is BLAS threads oversubscribing the cores.
        threadpool_limits(limits=1, user_api="blas")
        self.store: Store = store if store is not None else _make_store(config)
        artifacts = config.resolve_path(config.artifacts) if config.artifacts else None
        _check_needs(config, artifacts)
        if artifacts is not None:
            _check_artifacts(config, artifacts)
        context = SourceContext(artifacts=artifacts, store=self.store, config_dir=config.base_dir)
        self.sources: list[Source] = []
        try:
            for sc in config.sources:
                self.sources.append(sc.source_class(sc.name, sc.resolved_params, context))
        except Exception:
            self.close()
            raise
        slots = [
            SourceSlot(
                source=src,
                timeout_ms=sc.timeout_ms,
                weight=sc.weight,
                quota=sc.quota,
                required=sc.required,
                breaker=CircuitBreaker(config.breaker.failures, config.breaker.cooldown_s),
            )
            for src, sc in zip(self.sources, config.sources, strict=True)
        ]
        blocklist = None
        if config.blend.blocklist is not None:
            blocklist = load_blocklist(config.resolve_path(config.blend.blocklist))
        self._blender = Blender(
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
            curves=_load_curves(config, artifacts),
        )
        self._closed = False
        self._warm_up()

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

        futures = [self._blender.submit(touch, src) for src in self.sources]
        concurrent.futures.wait(futures, timeout=budget_s)

    @classmethod
    def from_yaml(cls, path: str | Path, *, store: Store | None = None) -> Retriever:
        return cls(load_config(path), store=store)

    # -- serving ---------------------------------------------------------------------------

    def request(
        self,
        request: Request | None = None,
        *,
        user_id: UserId | None = None,
        history: Sequence[ItemId] | None = None,
        seed_items: Sequence[ItemId] = (),
        context: Mapping[str, str] | None = None,
        exclude: Iterable[ItemId] = (),
        k: int | None = None,
        deadline_ms: float | None = None,
        vector: npt.ArrayLike | None = None,
    ) -> Request:
        """The request ``blend`` will serve: the store fills in history the caller left out."""
        if request is None:
            request = Request(
                user_id=user_id,
                history=tuple(history or ()),
                seed_items=tuple(seed_items),
                context=dict(context or {}),
                exclude=frozenset(exclude),
                k=k,
                deadline_ms=deadline_ms,
                vector=None if vector is None else np.asarray(vector, dtype=np.float32),
            )
        if request.user_id is not None and not request.history and self.config.store.history_len:
            items, stamps, types = self.store.history(request.user_id)
            if items:
                request = _replace_history(request, items, stamps, types)
        return request

    def blend(self, request: Request | None = None, **kwargs: Any) -> CandidateSet:
        """Up to k deduplicated candidates within the deadline, whatever the sources do."""
        return self._blender.blend(self.request(request, **kwargs))

    async def ablend(self, request: Request | None = None, **kwargs: Any) -> CandidateSet:
        """The asyncio twin of ``blend``: waits on the sources without blocking the loop."""
        return await self._blender.ablend(self.request(request, **kwargs))

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
        self.store.record(list(events))

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_closed", False):
            return
        self._closed = True
        blender = getattr(self, "_blender", None)
        if blender is not None:
            blender.close()
        for src in self.sources:
            src.close()
        self.store.close()

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_store(config: RetrievalConfig) -> Store:
    if config.store.kind == "memory":
        return MemoryStore(history_len=config.store.history_len)
    raise ConfigError(
        config.origin, [("store.kind", "redis is not available in this version; use memory")]
    )


def _check_needs(config: RetrievalConfig, artifacts: Path | None) -> None:
    """Fail at load, not on the first request, when a source cannot possibly work."""
    problems = []
    for i, sc in enumerate(config.sources):
        needs = sc.source_class.needs
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


def _check_artifacts(config: RetrievalConfig, artifacts: Path) -> None:
    """Refuse a build of another format or made for other params, before touching its files."""
    learning = [sc for sc in config.sources if sc.source_class.learns()]
    if not learning:
        return
    manifest = open_artifacts(artifacts)
    for sc in learning:
        check_source(
            manifest,
            sc.name,
            sc.kind,
            params_hash(sc.kind, build_params_hash_input(sc.resolved_params)),
        )


def _replace_history(
    request: Request, items: list[ItemId], stamps: list[float], types: list[str]
) -> Request:
    return Request(
        user_id=request.user_id,
        history=tuple(items),
        history_timestamps=tuple(stamps),
        history_event_types=tuple(types),
        seed_items=request.seed_items,
        context=request.context,
        exclude=request.exclude,
        k=request.k,
        deadline_ms=request.deadline_ms,
        vector=request.vector,
    )


_cache_lock = threading.Lock()
_cache: dict[Path, Retriever] = {}


def blend(config: str | Path | Retriever, **kwargs: Any) -> CandidateSet:
    """One call for the simple case: the retriever for ``config`` is loaded once and reused."""
    if isinstance(config, Retriever):
        return config.blend(**kwargs)
    path = Path(config).resolve()
    with _cache_lock:
        retriever = _cache.get(path)
        if retriever is None:
            retriever = _cache[path] = Retriever.from_yaml(path)
    return retriever.blend(**kwargs)
