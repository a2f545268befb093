"""`retrieval tune`: a small search end to end, its determinism, and the YAML it writes."""

from __future__ import annotations

import json

import pytest
import yaml

from retrieval.config import load_config
from retrieval.evaluation import tune as tune_module
from retrieval.tools.cli import main
from tests.session_log import write_session_log

CONFIG = """\
k: 30
deadline_ms: 50
artifacts: ${ARTIFACTS_DIR:-art}
blend: {strategy: rrf, exclude_seen: true, fallback: popular}
sources:
  - name: covisit
    kind: covisitation
    params: {window: 2, top_k: 50}
  - name: popular
    kind: popularity
    params: {half_life_days: 7}
  - name: recent
    kind: recent
"""

SMALL = {
    "covisitation": (("window", (2, 5)), ("history", (3, 10, 20))),
    "popularity": (("half_life_days", (7.0, 365.0)),),
    "recent": (("history", (50,)),),
}


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr(tune_module, "SEARCH_SPACES", SMALL)
    monkeypatch.setattr(tune_module, "WEIGHTS", (0.5, 1.0))
    monkeypatch.setattr(tune_module, "RRF_KS", (10.0, 60.0))
    log = tmp_path / "log.csv"
    write_session_log(log, sessions=500, seed=4)
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    cfg = cfg_dir / "config.yaml"
    cfg.write_text(CONFIG)
    return log, cfg


def test_tune_searches_sources_then_the_blend_and_is_deterministic(setup, tmp_path):
    log, cfg = setup
    config = load_config(cfg)
    runs = [
        tune_module.tune(
            config, log, budget_minutes=30, seed=3, users=150, workers=1, progress=False
        )
        for _ in range(2)
    ]
    one, two = runs
    assert not one.budget_exhausted
    assert [(t.source, t.note, t.recall, t.chosen) for t in one.trials] == [
        (t.source, t.note, t.recall, t.chosen) for t in two.trials
    ]
    assert one.config.model_dump() == two.config.model_dump()
    stages = [t.stage for t in one.trials]
    assert stages.index("blend") == stages.count("source")  # sources first, then the blend
    # Every value of the small space but the current one was tried, from the configured start.
    covisit = [t.note for t in one.trials if t.source == "covisit"]
    assert covisit == ["as configured", "window=5", "history=3", "history=10"]  # 20: current
    # Exactly one chosen trial per source and one for the blend, and it is the best seen
    # among the trials it could have been (coordinate descent only keeps improvements).
    for name in ("covisit", "popular", "recent", None):
        mine = [t for t in one.trials if t.source == name]
        chosen = [t for t in mine if t.chosen]
        assert len(chosen) == 1
        assert chosen[0].recall == max(t.recall for t in mine)
    assert one.after["blend"] >= one.before["blend"]
    for name in ("covisit", "popular", "recent"):
        assert one.after[name] >= one.before[name] - 1e-9


def test_cli_tune_writes_a_valid_config_with_measured_comments(setup, tmp_path, capsys):
    log, cfg = setup
    out = tmp_path / "out" / "tuned.yaml"
    out.parent.mkdir()
    report = tmp_path / "tune.html"
    js = tmp_path / "tune.json"
    code = main(
        [
            "tune",
            str(cfg),
            "--events",
            str(log),
            "--out",
            str(out),
            "--users",
            "150",
            "--seed",
            "1",
            "--json-out",
            str(js),
            "--report",
            str(report),
        ]
    )
    assert code == 0
    text = out.read_text()
    assert text.startswith("# Tuned from")
    assert "Validation recall@30" in text
    tuned = load_config(out)
    assert [s.name for s in tuned.sources] == ["covisit", "popular", "recent"]
    doc = yaml.safe_load(text)
    assert doc["artifacts"] == "${ARTIFACTS_DIR:-art}"  # placeholders are kept, not expanded
    data = json.loads(js.read_text())
    assert data["k"] == 30 and data["trials"] and "blend" in data["after"]
    chosen = next(t for t in data["trials"] if t["chosen"] and t["source"] == "covisit")
    covisit = tuned.source("covisit").resolved_params
    for key, value in chosen["params"].items():
        assert getattr(covisit, key) == value
    html = report.read_text()
    assert "<svg" in html and "covisit" in html
    printed = capsys.readouterr().out
    assert "as configured -> tuned" in printed


def test_tuned_paths_resolve_from_the_new_file(setup, tmp_path):
    log, cfg = setup
    text = cfg.read_text().replace("${ARTIFACTS_DIR:-art}", "build/art")
    cfg.write_text(text)
    out = tmp_path / "elsewhere" / "t.yaml"
    out.parent.mkdir()
    assert main(["tune", str(cfg), "--events", str(log), "--out", str(out), "--users", "120"]) == 0
    original = load_config(cfg)
    tuned = load_config(out)
    assert tuned.resolve_path(tuned.artifacts) == original.resolve_path(original.artifacts)


def test_tune_refuses_a_log_without_validation_users(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n1,1,100\n2,2,200\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("k: 1\nsources:\n  - {name: popular, kind: popularity}\n")
    out = tmp_path / "t.yaml"
    assert main(["tune", str(cfg), "--events", str(log), "--out", str(out)]) == 2
    assert not out.exists()


def test_a_trial_that_fails_is_reported_and_the_search_goes_on(setup, monkeypatch):
    from sources.covisitation import CovisitationSource

    log, cfg = setup
    real_build = CovisitationSource.build.__func__

    def build(cls, events, out_dir, params, progress=None):
        if params.window == 5:
            raise MemoryError("pretend window 5 does not fit")
        return real_build(cls, events, out_dir, params, progress)

    monkeypatch.setattr(CovisitationSource, "build", classmethod(build))
    result = tune_module.tune(
        load_config(cfg), log, budget_minutes=30, seed=3, users=150, workers=1, progress=False
    )
    failed = [t for t in result.trials if t.note.startswith("failed")]
    assert [t.params["window"] for t in failed] == [5]
    assert "pretend window 5" in failed[0].note
    assert any(t.note == "history=3" for t in result.trials)  # the next parameter was searched
    assert result.config.source("covisit").resolved_params.window != 5


@pytest.mark.parametrize("budget", ["0", "-5", "nan", "soon"])
def test_tune_refuses_a_budget_that_is_not_positive_minutes(budget, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "c.yaml", "--events", "l.csv", "--out", "t.yaml", "--budget-minutes", budget])
    assert exit_.value.code == 2
    assert "--budget-minutes" in capsys.readouterr().err
