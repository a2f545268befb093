"""The library's metrics sink and A/B arms, in process (the server's tests cover them over
HTTP): what the counters say after known blends, a failing sink, arm assignment and the arms'
config errors."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from retrieval import Retriever
from retrieval.config import ConfigError, RetrievalConfig
from retrieval.metrics import PrometheusMetrics, render
from retrieval.online.retriever import arm_point
from retrieval.types import CandidateSet
from tests.test_pipeline import TOY_SOURCES, toy_config


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_the_sink_counts_what_was_served() -> None:
    reg = CollectorRegistry()
    sources = [*TOY_SOURCES[:2], {**TOY_SOURCES[2], "timeout_ms": 50}]
    sources.append(
        {"name": "broken", "kind": "tests.toy_sources:ListSource", "params": {"fail": True}}
    )
    config = toy_config(sources=sources, breaker={"failures": 2, "cooldown_s": 60})
    with Retriever(config, metrics=PrometheusMetrics(reg)) as r:
        for user in range(6):
            r.blend(user_id=user, history=[1, 2, 3], exclude=[11])
    assert sample(reg, "retrieval_blend_seconds_count", arm="default") == 6
    assert sample(reg, "retrieval_source_calls_total", source="lists", status="ok") == 6
    assert sample(reg, "retrieval_source_seconds_count", source="lists") == 6
    # two failures open the breaker: the other four blends never call it
    assert sample(reg, "retrieval_source_calls_total", source="broken", status="error") == 2
    assert sample(reg, "retrieval_source_calls_total", source="broken", status="circuit_open") == 4
    assert sample(reg, "retrieval_breaker_open", source="broken") == 1
    assert sample(reg, "retrieval_breaker_open", source="lists") == 0
    # 11 is excluded in every blend; 1, 2, 3 of the history are seen (exclude_seen is on)
    assert sample(reg, "retrieval_candidates_total", kind="filtered") >= 6
    assert sample(reg, "retrieval_candidates_total", kind="returned") == 6 * 8
    assert sample(reg, "retrieval_store_reads_total", status="ok") == 6
    text, content_type = render(reg)
    assert b"retrieval_blend_seconds_bucket" in text and content_type.startswith("text/plain")


def test_filtered_counts_distinct_excluded_candidates() -> None:
    config = toy_config(blend={"strategy": "rrf", "exclude_seen": False, "fallback": None})
    with Retriever(config) as r:
        assert r.blend(history=[5]).filtered == 0
        res = r.blend(history=[5], exclude=[11, 12, 999])  # 999 was never a candidate
        assert res.filtered == 2
        assert 11 not in res.item_ids.tolist() and 12 not in res.item_ids.tolist()


def test_a_failing_sink_never_fails_a_blend(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def observe(self, result: CandidateSet) -> None:
            raise RuntimeError("sink down")

    with Retriever(toy_config(), metrics=Broken()) as r:
        assert len(r.blend(history=[1])) == 8
    assert "metrics sink failed" in caplog.text


def arms_config(**experiment: Any) -> RetrievalConfig:
    base = {
        "salt": "s1",
        "arms": [
            {"name": "a", "share": 0.25},
            {
                "name": "b",
                "share": 0.75,
                "sources": ["lists", "pop"],
                "blend": {"strategy": "score"},
            },
        ],
    }
    return toy_config(experiment={**base, **experiment})


def test_arms_split_users_by_share_and_keep_them() -> None:
    with Retriever(arms_config()) as r:
        arms = [r.blend(user_id=u, history=[1]).arm for u in range(2000)]
        assert set(arms) == {"a", "b"}
        share_b = arms.count("b") / len(arms)
        assert 0.72 < share_b < 0.78, share_b
        res = r.blend(user_id=3, history=[1])
        if res.arm == "b":
            assert res.source_names == ("lists", "pop")
        assert all(r.blend(user_id=u, history=[1]).arm == arms[u] for u in range(50))
        assert r.blend(history=[1]).arm == "a"  # no user: the first arm
    with Retriever(arms_config(salt="s2")) as r:
        moved = sum(r.blend(user_id=u, history=[1]).arm != arms[u] for u in range(400))
    assert moved > 50  # a new salt reshuffles


def test_arm_point_is_stable_and_uniform() -> None:
    assert arm_point("x", 123) == arm_point("x", "123")
    assert arm_point("x", 1) != arm_point("y", 1)
    points = np.array([arm_point("salt", u) for u in range(20_000)])
    assert points.min() >= 0 and points.max() < 1
    counts = np.histogram(points, bins=10, range=(0, 1))[0]
    assert counts.min() > 1800 and counts.max() < 2200, counts
    assert arm_point("pinned", 42) == pytest.approx(arm_point("pinned", 42))


@pytest.mark.parametrize(
    ("arms", "where", "says"),
    [
        ([{"name": "a", "share": 0.5}, {"name": "b", "share": 0.4}], "experiment.arms", "sum to 1"),
        ([{"name": "a", "share": 1.0}], "experiment.arms", "at least two"),
        (
            [{"name": "a", "share": 0.5}, {"name": "a", "share": 0.5}],
            "experiment.arms[1].name",
            "duplicate",
        ),
        (
            [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "sources": ["nope"]}],
            "experiment.arms[1].sources[0]",
            "no source named 'nope'",
        ),
        (
            [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "blend": {"strategy": "x"}}],
            "experiment.arms[1].blend.strategy",
            "rrf",
        ),
        (
            [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "sources": ["lists"]}],
            "experiment.arms[1].blend.fallback",
            "not among this arm's sources",
        ),
        (
            [{"name": "a b", "share": 0.5}, {"name": "b", "share": 0.5}],
            "experiment.arms[0].name",
            "",
        ),
    ],
)
def test_arm_config_errors_name_the_field(arms: list[Any], where: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        toy_config(experiment={"arms": arms})
    text = str(err.value)
    assert where in text and says in text, text


def test_tracer_writes_a_blend_span_and_one_per_source() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from retrieval.serve.tracing import BlendTracer

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = BlendTracer(provider.get_tracer("test"))
    sources = [
        *TOY_SOURCES,
        {"name": "bad", "kind": "tests.toy_sources:ListSource", "params": {"fail": True}},
    ]
    with Retriever(toy_config(sources=sources)) as r:
        started = time.time_ns()
        result = r.blend(user_id=5, history=[1, 2])
    tracer.record(result, started, "rid-1")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"blend", "source lists", "source echo", "source pop", "source bad"}
    blend = spans["blend"]
    assert blend.attributes["retrieval.request_id"] == "rid-1"
    assert blend.attributes["retrieval.count"] == len(result)
    for name in ("lists", "echo", "pop", "bad"):
        span = spans[f"source {name}"]
        assert span.parent is not None and span.parent.span_id == blend.context.span_id
        assert blend.start_time <= span.start_time <= span.end_time <= blend.end_time
        assert span.attributes["retrieval.status"] == result.report(name).status.value
    assert not spans["source bad"].status.is_ok
