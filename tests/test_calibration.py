"""Rank curves and the calibrated merge, on cases computed by hand."""

import numpy as np
import pytest

from blender.calibration import Calibration, RankCurve, fit_curve, isotonic_decreasing
from blender.merge import SourceList, merge
from retrieval.errors import ArtifactError


def test_isotonic_pools_violators():
    v = np.array([0.5, 0.2, 0.3, 0.1])
    w = np.ones(4)
    assert isotonic_decreasing(v, w).tolist() == pytest.approx([0.5, 0.25, 0.25, 0.1])


def test_fit_curve_is_monotone_and_binned():
    hits = np.array([5, 3, 4, 1, 0, 0, 1, 0], dtype=float)
    reach = np.full(8, 10.0)
    c = fit_curve(hits, reach)
    assert c.edges == (0, 1, 2, 4)
    assert all(a >= b for a, b in zip(c.p, c.p[1:], strict=False))
    d = c.dense(10)
    assert d.size == 10 and d[0] == c.p[0] and d[9] == c.p[-1]


def test_calibration_round_trip_and_missing_curve(tmp_path):
    cal = Calibration({"a": RankCurve((0, 1), (0.3, 0.1))}, users=7)
    path = tmp_path / "c.json"
    cal.save(path)
    back = Calibration.load(path, ["a"])
    assert back.curves["a"].p == (0.3, 0.1) and back.users == 7
    with pytest.raises(ArtifactError, match="no curve for sources"):
        Calibration.load(path, ["a", "b"])
    with pytest.raises(ArtifactError, match=r"nope\.json: missing calibration.*calibrate"):
        Calibration.load(tmp_path / "nope.json", ["a"])
    path.write_text('{"format_version": 99, "curves": {}}')
    with pytest.raises(ArtifactError, match=r"format_version 99.*reads format_version 1.*rerun"):
        Calibration.load(path, ["a"])


def sl(ids, curve, quota=None):
    ids = np.asarray(ids, dtype=np.int64)
    return SourceList(
        ids,
        np.zeros(ids.size, np.float32),
        np.arange(ids.size, dtype=np.int32),
        quota=quota,
        curve=np.asarray(curve, dtype=np.float64),
    )


def test_calibrated_merge_combines_evidence():
    # a is strong at the top; b is weak; item 3 is found by both.
    a = sl([1, 2, 3], [0.5, 0.2, 0.1])
    b = sl([3, 4], [0.15, 0.05])
    m = merge([a, b], k=4, strategy="calibrated", rrf_k=60)
    p3 = 1 - (1 - 0.1) * (1 - 0.15)
    assert m.item_ids.tolist() == [1, 3, 2, 4]
    assert m.scores.tolist() == pytest.approx([0.5, p3, 0.2, 0.05])


def test_calibrated_quota_is_a_floor():
    a = sl([1, 2, 3], [0.5, 0.4, 0.3])
    b = sl([9], [0.01], quota=1)
    m = merge([a, b], k=2, strategy="calibrated", rrf_k=60)
    assert sorted(m.item_ids.tolist()) == [1, 9]
    assert m.item_ids.tolist() == [1, 9]  # still ordered by chance


def test_cli_calibrate_writes_curves_a_calibrated_retriever_serves(tmp_path):
    from retrieval.online.retriever import Retriever
    from retrieval.tools.cli import main
    from tests.session_log import write_session_log

    log = tmp_path / "log.csv"
    write_session_log(log, sessions=300, seed=5)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "k: 20\nartifacts: art\nblend: {strategy: calibrated, exclude_seen: false}\nsources:\n"
        "  - {name: covisit, kind: covisitation}\n  - {name: popular, kind: popularity}\n"
    )
    assert main(["build", str(cfg), "--events", str(log)]) == 0
    assert main(["calibrate", str(cfg), "--events", str(log), "--users", "100"]) == 0
    curves = Calibration.load(tmp_path / "art" / "calibration.json", ["covisit", "popular"])
    assert curves.users > 0 and curves.curves["covisit"].p[0] > 0
    with Retriever.from_yaml(cfg) as retriever:
        result = retriever.blend(user_id="s1", history=[1, 2])
    assert len(result) == 20
