"""The examples run as the README says, here on smaller data."""

import sys
from pathlib import Path

import numpy as np
import pytest

from retrieval import SourceStatus

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def examples():
    sys.path.insert(0, str(EXAMPLES))
    import custom_source
    import evaluate
    import quickstart

    yield quickstart, custom_source, evaluate
    sys.path.remove(str(EXAMPLES))


def test_quickstart_then_custom_source(examples, tmp_path, capsys):
    quickstart, custom_source, _ = examples
    result = quickstart.main(n_items=3000, n_users=500, n_events=20000, workdir=tmp_path)
    assert len(result) == 1000
    assert np.unique(result.item_ids).size == 1000
    assert result.report("covisit").status is SourceStatus.OK
    out = capsys.readouterr().out
    assert "per-source report" in out and "built 4 sources" in out

    picks = custom_source.main(artifacts=tmp_path / "artifacts")
    assert picks.report("editors").status is SourceStatus.OK
    assert picks.item_ids[:2].tolist() == [1000010, 1000011]  # the DE picks, weighted 2x
    assert len(picks) == 20


def test_evaluate_example(examples, tmp_path, capsys):
    _, _, evaluate = examples
    report = evaluate.main(
        n_items=2000, n_users=300, n_events=15000, users=100, ks=(10, 100), workdir=tmp_path
    )
    assert set(report.sources) == {"covisit", "itemcf", "ann", "popular", "recent"}
    assert {"round_robin", "calibrated"} <= set(report.variants)
    assert 0 < report.blend["recall@100"] <= 1
    assert "BLEND:calibrated" in capsys.readouterr().out
