"""End to end: synthesize a log, build all sources through the CLI, blend with provenance."""

import json
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from retrieval import Retriever, SourceStatus
from retrieval.tools.cli import main
from retrieval.tools.synth import synthesize

CONFIG = """
k: 200
deadline_ms: 2000
artifacts: build
events: {segments: [country]}
blend: {strategy: rrf, exclude_seen: true, fallback: popular}
sources:
  - name: covisit
    kind: covisitation
    params: {window: 5, top_k: 50}
  - name: itemcf
    kind: itemcf
    params: {neighbours: 50}
  - name: ann
    kind: ann
    params: {factors: 16, iterations: 5, n_trees: 8}
  - name: popular
    kind: popularity
    weight: 0.2
    params: {segments: [country]}
  - name: recent
    kind: recent
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    log = root / "log.parquet"
    synthesize(log, n_items=1500, n_users=300, n_events=6000, seed=3)
    cfg = root / "retrieval.yaml"
    cfg.write_text(textwrap.dedent(CONFIG))
    assert main(["build", str(cfg), "--events", str(log)]) == 0
    return cfg, log


def test_build_writes_a_manifest_for_every_learning_source(built):
    cfg, _ = built
    manifest = json.loads((cfg.parent / "build" / "manifest.json").read_text())
    assert set(manifest["sources"]) == {"covisit", "itemcf", "ann", "popular"}
    assert manifest["counts"]["events"] == 6000


def test_blend_returns_k_unique_candidates_from_all_sources(built):
    cfg, log = built
    events = pq.read_table(log, columns=["user_id", "item_id"])
    uid = events.column("user_id").to_numpy()
    iid = events.column("item_id").to_numpy()
    seen_sources = set()
    with Retriever.from_yaml(cfg) as r:
        for u in np.unique(uid)[:20].tolist():
            hist = iid[uid == u][-10:].tolist()
            res = r.blend(user_id=u, history=hist, context={"country": "US"})
            assert len(res) == 200
            assert np.unique(res.item_ids).size == 200
            assert not set(res.item_ids.tolist()) & set(hist)
            assert res.report("popular").status is SourceStatus.OK
            for j, name in enumerate(res.source_names):
                if (res.ranks[:, j] >= 0).any():
                    seen_sources.add(name)
    assert {"covisit", "itemcf", "ann", "popular"} <= seen_sources


def test_cold_user_gets_a_full_slate_from_popularity(built):
    cfg, _ = built
    with Retriever.from_yaml(cfg) as r:
        res = r.blend(user_id="never-seen")
        assert len(res) == 200
        assert res.report("covisit").status is SourceStatus.SKIPPED
        assert res.from_source("popular").all()


def test_changed_build_params_are_refused(built, tmp_path):
    cfg, _ = built
    text = cfg.read_text().replace("window: 5", "window: 7")
    other = cfg.parent / "changed.yaml"
    other.write_text(text)
    with pytest.raises(Exception, match="rebuild"):
        Retriever.from_yaml(other)
