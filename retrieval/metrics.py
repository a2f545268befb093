"""Blend metrics, recorded by the library: an app that embeds a ``Retriever`` and ``retrieval
serve`` export the same series.

A ``Retriever(metrics=sink)`` hands each served result to ``sink.observe`` once, on the caller's
thread, after the answer is complete; a sink that raises is logged and never fails the blend.
``MetricsSink`` is the whole contract, so a StatsD or OpenTelemetry sink is a class with one
method. ``PrometheusMetrics`` is the built-in one (seconds, Prometheus naming):

    retrieval_blend_seconds{arm}                   histogram of whole blends (caller's clock)
    retrieval_source_seconds{source}               histogram of each source's call
    retrieval_source_calls_total{source,status}    ok, timeout, error, skipped, circuit_open, shed
    retrieval_candidates_total{kind}               returned, backfilled, filtered
    retrieval_breaker_open{source}                 1 when the source's last call was refused by
                                                   its breaker
    retrieval_store_reads_total{status}            ok, degraded
    retrieval_cache_hits_total

prometheus_client keeps the values; under ``retrieval serve`` its multiprocess mode sums the
workers' values (``PROMETHEUS_MULTIPROC_DIR``, set by the server before the workers start).
Label children are looked up once per label set and kept, so one blend costs a few dict reads
and ~15 value updates (``benchmarks/metrics_overhead.py`` measures it).
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from retrieval.types import CandidateSet, SourceStatus

__all__ = ["BLEND_BUCKETS", "SOURCE_BUCKETS", "MetricsSink", "PrometheusMetrics", "render"]

BLEND_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1)
SOURCE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.03, 0.05)


class MetricsSink(Protocol):
    """Receives every result a ``Retriever`` serves (cache hits included)."""

    def observe(self, result: CandidateSet) -> None:
        """Record one served blend; called on the request's thread, so keep it cheap."""


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - a dependency
        raise ImportError(
            "PrometheusMetrics needs prometheus_client: pip install prometheus-client"
        ) from exc
    return prometheus_client


class PrometheusMetrics:
    """The built-in sink: prometheus_client metrics on ``registry`` (the default registry when
    None; pass your own to keep two retrievers' series apart)."""

    def __init__(self, registry: Any = None, *, namespace: str = "retrieval") -> None:
        pc = _prometheus()
        reg = pc.REGISTRY if registry is None else registry
        ns = namespace
        self.registry = reg
        self._blend = pc.Histogram(
            f"{ns}_blend_seconds",
            "Whole blends on the caller's clock, store read included.",
            ["arm"],
            buckets=BLEND_BUCKETS,
            registry=reg,
        )
        self._source = pc.Histogram(
            f"{ns}_source_seconds",
            "Each source's call, from its start to its answer or abandonment.",
            ["source"],
            buckets=SOURCE_BUCKETS,
            registry=reg,
        )
        self._calls = pc.Counter(
            f"{ns}_source_calls",
            "Source calls by how they ended (SourceStatus).",
            ["source", "status"],
            registry=reg,
        )
        self._candidates = pc.Counter(
            f"{ns}_candidates",
            "Candidates returned, of which backfilled, and distinct candidates filtered out.",
            ["kind"],
            registry=reg,
        )
        self._breaker = pc.Gauge(
            f"{ns}_breaker_open",
            "1 when the source's last call was refused by its circuit breaker.",
            ["source"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self._store = pc.Counter(
            f"{ns}_store_reads", "Blends by the store read's outcome.", ["status"], registry=reg
        )
        self._cache_hits = pc.Counter(
            f"{ns}_cache_hits", "Blends answered from the result cache.", registry=reg
        )
        self._returned = self._candidates.labels("returned")
        self._backfilled = self._candidates.labels("backfilled")
        self._filtered = self._candidates.labels("filtered")
        self._by_arm: dict[str | None, Any] = {}
        self._by_source: dict[str, tuple[Any, Any, dict[SourceStatus, Any]]] = {}
        self._breaker_seen: dict[str, float] = {}
        self._store_ok = self._store.labels("ok")
        self._store_degraded = self._store.labels("degraded")

    def observe(self, result: CandidateSet) -> None:
        blend = self._by_arm.get(result.arm)
        if blend is None:
            blend = self._by_arm[result.arm] = self._blend.labels(result.arm or "default")
        blend.observe(result.elapsed_ms / 1000.0)
        if result.cache_hit:
            self._cache_hits.inc()
        (self._store_ok if result.store_status == "ok" else self._store_degraded).inc()
        self._returned.inc(len(result))
        if result.backfilled:
            self._backfilled.inc(result.backfilled)
        if result.filtered:
            self._filtered.inc(result.filtered)
        if result.cache_hit:
            return  # the reports are the original blend's, already counted
        for rep in result.reports:
            per = self._by_source.get(rep.name)
            if per is None:
                per = self._by_source[rep.name] = (
                    self._source.labels(rep.name),
                    self._breaker.labels(rep.name),
                    {s: self._calls.labels(rep.name, s.value) for s in SourceStatus},
                )
            latency, breaker, calls = per
            calls[rep.status].inc()
            if rep.status is not SourceStatus.CIRCUIT_OPEN:
                if rep.status is not SourceStatus.SHED:
                    latency.observe(rep.latency_ms / 1000.0)
                is_open = 0.0
            else:
                is_open = 1.0
            if self._breaker_seen.get(rep.name) != is_open:
                self._breaker_seen[rep.name] = is_open
                breaker.set(is_open)


def render(registry: Any = None) -> tuple[bytes, str]:
    """The Prometheus text exposition and its content type: of ``registry``, or, when the
    process runs under ``PROMETHEUS_MULTIPROC_DIR``, of every process sharing that folder."""
    pc = _prometheus()
    if registry is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = pc.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    reg = pc.REGISTRY if registry is None else registry
    return pc.generate_latest(reg), pc.CONTENT_TYPE_LATEST
