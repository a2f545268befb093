"""A build reads only the log columns its sources name (``Source.reads``), and what it writes
does not depend on what else was read."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from retrieval.config import load_config
from retrieval.offline import build as build_module
from retrieval.offline.build import build
from retrieval.tools.synth import synthesize

CONFIG = """
artifacts: build
events: {segments: [country]}
sources:
  - {name: covisit, kind: covisitation, params: {window: 5, top_k: 30}}
  - {name: itemcf, kind: itemcf, params: {neighbours: 30}}
  - {name: ann, kind: ann, params: {factors: 8, iterations: 3}}
  - {name: popular, kind: popularity, params: {segments: [country]}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("columns")
    log = root / "log.parquet"
    synthesize(log, n_items=800, n_users=200, n_events=5000, seed=1)
    cfg = root / "retrieval.yaml"
    cfg.write_text(textwrap.dedent(CONFIG))
    config = load_config(cfg)
    build(config, log, root / "all", progress=False)
    return config, log, root


def files_of(out: Path, name: str) -> dict:
    return json.loads((out / "manifest.json").read_text())["sources"][name]["files"]


@pytest.mark.parametrize(
    ("name", "sessions", "segments"),
    [("covisit", True, []), ("itemcf", False, []), ("ann", False, []),
     ("popular", False, ["country"])],
)  # fmt: skip
def test_one_source_alone_reads_its_columns_and_writes_the_same_bytes(
    setup, monkeypatch, name, sessions, segments
):
    config, log, root = setup
    calls = []
    real = build_module.read_events

    def spy(path, columns=None, segs=(), **kw):
        calls.append((list(segs), kw.get("read_sessions", True)))
        return real(path, columns, segs, **kw)

    monkeypatch.setattr(build_module, "read_events", spy)
    out = root / f"only-{name}"
    build(config, log, out, only=[name], progress=False)
    assert calls == [(segments, sessions)]
    assert files_of(out, name) == files_of(root / "all", name)  # sizes and SHA-256 of each file


def test_columns_no_later_source_reads_are_released_between_builders(setup, monkeypatch, tmp_path):
    """Session ids (0.8 GB at 100M events) are dropped once co-visitation, the one source that
    reads them, is built; segments stay until popularity, which reads them, is built."""
    config, log, _ = setup
    seen = {}
    real = build_module._build_one

    def spy(sc, events, *args):
        seen[sc.name] = (events.sessions is not None, sorted(events.segments))
        return real(sc, events, *args)

    monkeypatch.setattr(build_module, "_build_one", spy)
    build(config, log, tmp_path / "out", progress=False)
    assert seen == {
        "covisit": (True, ["country"]),
        "itemcf": (False, ["country"]),
        "ann": (False, ["country"]),
        "popular": (False, ["country"]),
    }
