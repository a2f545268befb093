"""OpenTelemetry spans for served blends: one ``blend`` span and a child per source.

Optional (``pip install 'candidate-retrieval[otel]'``) and off unless asked for (``retrieval
serve --otel``): when off, nothing is imported and a request pays one ``is None`` test. The
spans are written after the blend from its result (the sources run on their own threads, and
the report already holds each one's latency and outcome), under the tracer provider the
process configured, e.g. with ``opentelemetry-instrument retrieval serve ...``.
"""

from __future__ import annotations

from typing import Any

from retrieval.types import CandidateSet, SourceStatus

__all__ = ["BlendTracer"]


class BlendTracer:
    """Writes a finished blend as spans on ``tracer`` (the global provider's when None)."""

    def __init__(self, tracer: Any = None) -> None:
        try:
            from opentelemetry import trace
        except ImportError as exc:
            raise ImportError(
                "tracing needs OpenTelemetry: pip install 'candidate-retrieval[otel]'"
            ) from exc
        self._trace = trace
        self.tracer = tracer if tracer is not None else trace.get_tracer("candidate-retrieval")

    def record(self, result: CandidateSet, started_ns: int, request_id: str = "") -> None:
        """Spans for ``result``, which started at ``started_ns`` (``time.time_ns``)."""
        end_ns = started_ns + int(result.elapsed_ms * 1e6)
        span = self.tracer.start_span(
            "blend",
            start_time=started_ns,
            attributes={
                "retrieval.request_id": request_id,
                "retrieval.arm": result.arm or "",
                "retrieval.count": len(result),
                "retrieval.backfilled": result.backfilled,
                "retrieval.cache_hit": result.cache_hit,
                "retrieval.store": result.store_status,
            },
        )
        parent = self._trace.set_span_in_context(span)
        # The sources start together once the store is read (the report keeps latencies, not
        # start times): the longest call is taken to end with the blend.
        longest = max((r.latency_ms for r in result.reports), default=0.0)
        source_start = max(started_ns, end_ns - int(longest * 1e6))
        for rep in result.reports:
            child = self.tracer.start_span(
                f"source {rep.name}",
                context=parent,
                start_time=source_start,
                attributes={
                    "retrieval.source": rep.name,
                    "retrieval.status": rep.status.value,
                    "retrieval.returned": rep.returned,
                    "retrieval.survived": rep.survived,
                },
            )
            if rep.status is SourceStatus.ERROR and rep.error:
                child.set_status(self._trace.Status(self._trace.StatusCode.ERROR, rep.error))
            child.end(end_time=source_start + int(rep.latency_ms * 1e6))
        span.end(end_time=end_ns)
