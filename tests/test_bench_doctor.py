"""`retrieval bench` on a tiny build writes the documented JSON; `retrieval doctor` runs."""

import json
import textwrap

import pytest

from retrieval.tools.cli import main
from retrieval.tools.synth import synthesize

pytest.importorskip("faiss")

CONFIG = """
k: 100
deadline_ms: 2000
artifacts: build
events: {segments: [country]}
blend: {fallback: popular}
sources:
  - name: covisit
    kind: covisitation
    params: {window: 5, top_k: 50}
  - name: itemcf
    kind: itemcf
    params: {neighbours: 50}
  - name: ann
    kind: ann
    params: {factors: 8, iterations: 3, backend: faiss}
  - name: popular
    kind: popularity
    params: {segments: [country]}
"""


def test_bench_json_has_the_documented_keys(tmp_path, capsys):
    log = tmp_path / "log.parquet"
    synthesize(log, n_items=800, n_users=200, n_events=4000, seed=1)
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(textwrap.dedent(CONFIG))
    assert main(["build", str(cfg), "--events", str(log)]) == 0
    out = tmp_path / "bench.json"
    args = ["bench", str(cfg), "--artifacts", str(tmp_path / "build"), "--events", str(log)]
    args += ["--requests", "60", "--concurrency", "2", "--exact-queries", "20"]
    args += ["--json-out", str(out)]
    assert main(args) == 0
    d = json.loads(out.read_text())
    for key in ("requests", "concurrency", "p50_ms", "p95_ms", "p99_ms", "qps", "rss_mb"):
        assert key in d, key
    assert d["requests"] == 60 and d["concurrency"] == 2 and d["rss_mb"] > 0
    assert isinstance(d["major_faults"], int) and d["major_faults"] >= 0
    assert set(d["sources"]) == {"covisit", "itemcf", "ann", "popular"}
    for s in d["sources"].values():
        assert {"p50_ms", "p99_ms", "timeouts", "errors"} <= set(s)
    assert d["exact"]["queries"] > 0 and 0.0 <= d["exact"]["recall_at_100"] <= 1.0
    # both exact baselines timed; the faster is the one the ANN time is compared with
    e = d["exact"]
    assert e["exact_numpy_p50_ms"] > 0 and e["exact_faiss_flat_p50_ms"] > 0
    assert e["exact_p50_ms"] == min(e["exact_numpy_p50_ms"], e["exact_faiss_flat_p50_ms"])
    printed = capsys.readouterr().out
    assert "blend()" in printed and "exact top-100" in printed
    # without a log: users from the build's id map
    assert (
        main(
            [
                "bench",
                str(cfg),
                "--artifacts",
                str(tmp_path / "build"),
                "--requests",
                "5",
                "--exact-queries",
                "0",
            ]
        )
        == 0
    )
    # two serving processes over the same artifacts: every request answered once, in one of them
    args = ["bench", str(cfg), "--artifacts", str(tmp_path / "build"), "--events", str(log)]
    args += ["--requests", "40", "--processes", "2", "--exact-queries", "0", "--json-out", str(out)]
    assert main(args) == 0
    d = json.loads(out.read_text())
    assert d["processes"] == 2 and d["requests"] == 40 and d["qps"] > 0
    for s in d["sources"].values():
        assert s["ok"] + s["timeouts"] + s["errors"] + s["skipped"] == 40
    assert "in each of 2 processes" in capsys.readouterr().out


def test_doctor_prints_every_section(capsys):
    assert main(["doctor", "--items", "2000", "--queries", "40"]) == 0
    out = capsys.readouterr().out
    for section in ("== versions", "== thread pools", "== BLAS", "== CPU", "== GIL"):
        assert section in out, section
    for lib in ("numpy", "scipy", "implicit", "annoy", "faiss-cpu", "redis", "pyarrow"):
        assert lib in out
    assert "annoy:" in out and "faiss:" in out
