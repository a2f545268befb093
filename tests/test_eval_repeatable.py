"""Offline recall does not depend on machine load, and the validation split that tune and the
calibration use gives every validation user a history, even in session logs."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from retrieval.config import load_config
from retrieval.evaluation.evaluate import evaluate, holdout_split, load_for_eval
from retrieval.offline.events import read_events
from retrieval.online.retriever import Retriever
from retrieval.types import Request
from tests.session_log import write_session_log

SLOW = """
k: 4
deadline_ms: 50
blend: {strategy: rrf, exclude_seen: false}
sources:
  - name: slow
    kind: tests.toy_sources:ListSource
    timeout_ms: 5
    params: {items: [13, 14, 15, 16], delay_ms: 30}
  - name: fast
    kind: tests.toy_sources:ListSource
    params: {items: [99, 98]}
"""

LOG = """user_id,item_id,timestamp
4,20,90
4,21,91
1,10,100
2,11,110
3,12,120
1,13,200
2,14,210
3,15,220
"""


def test_blend_recall_counts_a_source_the_live_blend_dropped_and_reports_the_timeouts(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(LOG)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent(SLOW))
    config = load_config(cfg)
    split, path = load_for_eval(config, log, None, None, "200", None, None)
    report = evaluate(config, split, path, [4], workers=1, progress=False, calibrate_blend=False)
    # Live, `slow` (30 ms against a 5 ms timeout) never makes it; offline its answer is merged:
    # rrf of [13, 14, 15, 16] and [99, 98] -> 13, 99, 14, 98: users 1 and 2 hit, user 3 not.
    assert report.blend["recall@4"] == pytest.approx(2 / 3)
    assert report.sources["slow"]["over_timeout"] == 3
    assert report.sources["slow"]["live_timeouts"] >= 1
    assert report.sources["fast"]["over_timeout"] == 0


def test_combine_is_what_blend_returns_when_nothing_is_late(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        textwrap.dedent(
            """
            k: 5
            blend: {strategy: rrf, exclude_seen: true, fallback: catalog}
            sources:
              - {name: a, kind: tests.toy_sources:ListSource, params: {items: [1, 2, 3, 4]}}
              - {name: echo, kind: tests.toy_sources:HistoryEcho, weight: 2}
              - {name: catalog, kind: tests.toy_sources:CatalogSource, params: {n: 50}}
            """
        )
    )
    with Retriever.from_yaml(cfg) as retriever:
        for history in [(), (1, 7), (2, 3, 4, 5)]:
            req = Request(user_id=1, history=history, k=5, exclude=frozenset({6}))
            live = retriever.blend(req)
            answers = [src.retrieve(req, 5 + 8, None) for src in retriever.sources]  # type: ignore[arg-type]
            ids, _scores, ranks, backfilled = retriever.blender.combine(req, answers)
            assert ids.tolist() == live.item_ids.tolist()
            assert np.array_equal(ranks, live.ranks)
            assert backfilled == live.backfilled


def test_two_evaluations_give_identical_figures(tmp_path):
    log = tmp_path / "log.csv"
    write_session_log(log, sessions=400, seed=3)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "k: 40\nblend: {exclude_seen: false}\nsources:\n"
        "  - {name: covisit, kind: covisitation}\n  - {name: popular, kind: popularity}\n"
        "  - {name: recent, kind: recent}\n"
    )
    config = load_config(cfg)
    split, path = load_for_eval(config, log, None, None, None, 0.2, None)
    one = evaluate(config, split, path, [5, 40], workers=1, progress=False)
    two = evaluate(config, split, path, [5, 40], workers=1, progress=False)

    def figures(report):  # everything but timings
        out = report.to_dict()
        for stats in [*out["sources"].values(), out["blend"]]:
            for key in ("p50_ms", "p99_ms", "over_timeout", "live_timeouts"):
                stats.pop(key, None)
        return out

    assert figures(one) == figures(two)
    assert one.blend["recall@40"] > 0


def test_holdout_split_gives_session_users_a_history_and_hides_their_targets(tmp_path):
    log = tmp_path / "log.csv"
    write_session_log(log, sessions=300, seed=1)
    events = read_events(log)
    split = holdout_split(events, 0.2, max_users=None, seed=7)
    # A plain time split would leave almost every late session without history.
    train = split.train
    train_users = set(train.user_ids.to_external(np.unique(train.users)).tolist())
    assert len(split.users) > 30
    assert set(split.users.tolist()) <= train_users  # every validation user has a history
    # Held-out events are not in the fit part: fit + held out = the whole log.
    assert len(train) + sum(t.size for t in split.targets) >= len(events) - len(events) // 5
    assert len(train) < len(events)
    again = holdout_split(events, 0.2, max_users=None, seed=7)
    assert [t.tolist() for t in again.targets] == [t.tolist() for t in split.targets]
    other = holdout_split(events, 0.2, max_users=None, seed=8)
    assert [t.tolist() for t in other.targets] != [t.tolist() for t in split.targets]


def test_calibrated_blend_is_not_the_popularity_list_on_a_session_log(tmp_path):
    """The collapse of issue 10: calibration measured on a plain time split of a session log,
    where validation users have no history, so only popularity got hits and the calibrated
    blend returned the popularity list. Curves now come from ``holdout_split``."""
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    write_session_log(train, sessions=600, seed=2, test_path=test, test_sessions=150)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "k: 30\nblend: {exclude_seen: false, strategy: rrf}\nsources:\n"
        "  - {name: covisit, kind: covisitation}\n  - {name: popular, kind: popularity}\n"
        "  - {name: recent, kind: recent}\n"
    )
    config = load_config(cfg)
    split, path = load_for_eval(config, None, train, test, None, None, None)
    report = evaluate(config, split, path, [10, 30], workers=1, progress=False)
    calibrated = report.variants["calibrated"]
    curves = report.calibration.curves
    assert curves["covisit"].p[0] > curves["popular"].p[0]
    for k in (10, 30):
        assert calibrated[f"recall@{k}"] > report.sources["popular"][f"recall@{k}"]
        assert calibrated[f"recall@{k}"] >= report.blend[f"recall@{k}"]
