"""Offline evaluation: metrics on a case computed by hand, the split, and bad arguments."""

import json
import textwrap

import numpy as np
import pytest

from retrieval.config import load_config
from retrieval.evaluation.evaluate import (
    EvalError,
    evaluate,
    load_for_eval,
    score_user,
    split_by_time,
)
from retrieval.offline.events import read_events
from retrieval.tools.cli import main

LOG = """user_id,item_id,timestamp
1,10,100
1,11,110
2,10,120
2,12,130
1,13,200
1,10,210
1,14,220
2,15,230
3,16,240
"""

CONFIG = """
k: 3
blend: {strategy: rrf, exclude_seen: false}
sources:
  - name: fixed
    kind: tests.toy_sources:ListSource
    params: {items: [13, 99, 14, 10]}
  - name: other
    kind: tests.toy_sources:ListSource
    params: {items: [15, 13]}
"""


@pytest.fixture
def files(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(LOG)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent(CONFIG))
    return log, cfg


def test_score_user_by_hand():
    cands = np.array([5, 6, 7, 8])
    targets = np.array([6, 8, 9])
    seen = np.array([6])
    r, rn, hit, hits = score_user(cands, targets, seen, k=2)
    assert r == pytest.approx(1 / 3) and hit and hits.tolist() == [6]
    assert rn == pytest.approx(0.0)  # new targets are 8 and 9: neither in the top 2
    r, rn, _, _ = score_user(cands, targets, seen, k=4)
    assert r == pytest.approx(2 / 3) and rn == pytest.approx(1 / 2)


def test_split_has_no_leak(files):
    log, _ = files
    events = read_events(log)
    split = split_by_time(events, cutoff=200, max_users=None)
    assert split.train.timestamps.max() < 200
    assert len(split.train) == 4
    # train maps know only train items: 13, 14, 15, 16 appear only after the cutoff
    assert sorted(split.train.item_ids.to_external(np.arange(len(split.train.item_ids)))) == [
        10,
        11,
        12,
    ]
    by_user = dict(zip(split.users.tolist(), [t.tolist() for t in split.targets], strict=True))
    assert by_user == {1: [10, 13, 14], 2: [15], 3: [16]}


def test_metrics_by_hand(files):
    log, cfg_path = files
    config = load_config(cfg_path)
    split = split_by_time(read_events(log), cutoff=200, max_users=None)
    report = evaluate(config, split, log, ks=[2, 3], workers=1, progress=False)
    f = report.sources["fixed"]
    # fixed@2 = [13, 99]: user1 targets {10,13,14} -> 1/3; user2 {15} -> 0; user3 {16} -> 0
    assert f["recall@2"] == pytest.approx((1 / 3) / 3)
    # @3 = [13, 99, 14]: user1 2/3 (99 is not a catalog item but it is what the source said)
    assert f["recall@3"] == pytest.approx((2 / 3) / 3)
    # new targets exclude re-visits: user1 saw 10 and 11 before; new = {13, 14}
    assert f["recall_new@3"] == pytest.approx((2 / 2 + 0 + 0) / 3)
    assert f["hitrate@3"] == pytest.approx(1 / 3)
    o = report.sources["other"]
    assert o["recall@2"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    # unique hits at 3: fixed alone finds 14 for user1; other alone finds 15 for user2
    assert f["unique_hits@3"] == 1 and o["unique_hits@3"] == 1
    b = report.blend
    # rrf of [13, 99, 14, 10] and [15, 13]: 13 first; then 15 (rank 0 in other) ties 99? no:
    # 15 = 1/61, 99 = 1/62 -> [13, 15, 99]
    assert b["recall@3"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert 0 < b["coverage"] <= 1


def test_bad_arguments(files, tmp_path):
    log, cfg_path = files
    config = load_config(cfg_path)
    with pytest.raises(EvalError, match="outside the log"):
        load_for_eval(config, log, None, None, "50", None, None)
    with pytest.raises(EvalError, match="outside the log"):
        load_for_eval(config, log, None, None, "2030-01-01", None, None)
    with pytest.raises(EvalError, match="exactly one"):
        load_for_eval(config, log, None, None, None, None, None)
    with pytest.raises(EvalError, match="between 0 and 1"):
        load_for_eval(config, log, None, None, None, 1.5, None)
    split, _ = load_for_eval(config, log, None, None, "200", None, None)
    with pytest.raises(EvalError, match="above the training catalog size"):
        evaluate(config, split, log, ks=[1000], progress=False)
    only_train = tmp_path / "train.csv"
    only_train.write_text("user_id,item_id,timestamp\n1,10,100\n")
    empty_test = tmp_path / "test.csv"
    empty_test.write_text("user_id,item_id,timestamp\n")
    with pytest.raises(ValueError):  # an empty test file is refused by the reader, by name
        load_for_eval(config, None, only_train, empty_test, None, None, None)


def test_cli_eval_json(files, tmp_path, capsys):
    log, cfg_path = files
    out = tmp_path / "m.json"
    code = main(
        [
            "eval",
            str(cfg_path),
            "--events",
            str(log),
            "--split-time",
            "200",
            "--k",
            "1,3",
            "--json-out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert data["k"] == [1, 3] and data["users"] == 3
    assert set(data["sources"]) == {"fixed", "other"}
    assert "recall@3" in data["blend"] and "coverage" in data["blend"]
    assert set(data["sources"]["fixed"]) >= {"recall@3", "recall_new@3", "hitrate@3", "p50_ms"}
    assert "unique_hits@3" in data["blend"]
    assert "unique_hits@1" in data["sources"]["fixed"]
    assert "BLEND" in capsys.readouterr().out
    assert main(["eval", str(cfg_path), "--events", str(log), "--split-time", "5"]) == 2


def test_two_processes_give_the_same_metrics_as_one(tmp_path):
    from retrieval.tools.synth import synthesize

    log = tmp_path / "log.parquet"
    synthesize(log, n_items=1500, n_users=1200, n_events=24000, seed=5)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "k: 50\nblend: {exclude_seen: false}\nsources:\n"
        "  - {name: covisit, kind: covisitation}\n  - {name: popular, kind: popularity}\n"
    )
    config = load_config(cfg)
    split, path = load_for_eval(config, log, None, None, None, 0.2, 400)
    assert len(split.users) >= 256  # large enough for the process pool
    one = evaluate(config, split, path, [10, 50], workers=1, progress=False, calibrate_blend=False)
    two = evaluate(config, split, path, [10, 50], workers=2, progress=False, calibrate_blend=False)
    for name in ("covisit", "popular"):
        for key in ("recall@50", "recall_new@10", "hitrate@50", "unique_hits@50"):
            assert one.sources[name][key] == two.sources[name][key], (name, key)
    assert one.blend["recall@50"] == two.blend["recall@50"]


def test_cli_eval_report_embeds_every_figure(files, tmp_path):
    log, cfg_path = files
    out = tmp_path / "report.html"
    args = ["eval", str(cfg_path), "--events", str(log), "--split-time", "200", "--k", "1,3"]
    assert main([*args, "--report", str(out)]) == 0
    html = out.read_text()
    assert html.count("<svg") >= 3  # recall curves, overlap, latency
    for name in ("fixed", "other", "blend", "blend:round_robin"):
        assert name in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # nothing fetched
