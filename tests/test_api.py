"""The public face: Retriever, module-level blend, ablend, record, CLI, __all__."""

import asyncio
import json
import textwrap
import types

import pytest

import retrieval
from retrieval import Retriever, blend
from retrieval.tools.cli import main
from retrieval.types import SourceStatus

CONFIG = """
k: 5
deadline_ms: 200
blend: {strategy: rrf, exclude_seen: true, fallback: pop}
sources:
  - name: lists
    kind: tests.toy_sources:ListSource
    params: {items: [11, 12, 13, 14]}
  - name: echo
    kind: tests.toy_sources:HistoryEcho
  - name: pop
    kind: tests.toy_sources:CatalogSource
    weight: 0.1
    params: {n: 100}
"""


@pytest.fixture
def config_path(tmp_path):
    p = tmp_path / "retrieval.yaml"
    p.write_text(textwrap.dedent(CONFIG))
    return p


def test_all_is_honest():
    for name in retrieval.__all__:
        assert hasattr(retrieval, name), name
    public = {
        n
        for n in dir(retrieval)
        if not n.startswith("_") and not isinstance(getattr(retrieval, n), types.ModuleType)
    }
    stray = public - set(retrieval.__all__)
    assert not stray, f"exported but not in __all__: {stray}"


def test_retriever_blend_and_record(config_path):
    with Retriever.from_yaml(config_path) as r:
        res = r.blend(user_id="u1")
        assert len(res) == 5
        assert res.report("echo").status is SourceStatus.SKIPPED  # no history yet
        r.record("u1", 11, event_type="click")
        r.record("u1", 2, event_type="order")
        res = r.blend(user_id="u1")
        ids = res.item_ids.tolist()
        assert 11 not in ids and 2 not in ids  # exclude_seen uses the store's history
        assert 1002 in ids and 1011 in ids  # the history-driven source saw the recorded events
        assert res.report("echo").status is SourceStatus.OK


def test_history_in_the_call_wins_over_the_store(config_path):
    with Retriever.from_yaml(config_path) as r:
        r.record("u1", 11)
        res = r.blend(user_id="u1", history=[3])
        assert 1003 in res.item_ids.tolist() and 1011 not in res.item_ids.tolist()


def test_module_level_blend_loads_once(config_path):
    a = blend(config_path, user_id=1, k=3)
    b = blend(config_path, user_id=1, k=3)
    assert a.item_ids.tolist() == b.item_ids.tolist() and len(a) == 3
    assert len(retrieval.online.retriever._cache) >= 1


def test_ablend(config_path):
    async def go():
        with Retriever.from_yaml(config_path) as r:
            return await r.ablend(user_id=1, history=[5])

    res = asyncio.run(go())
    assert 1005 in res.item_ids.tolist()


def test_cli_validate_ok_and_bad(config_path, tmp_path, capsys):
    assert main(["validate", str(config_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 5 and out["sources"][0]["name"] == "lists"
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [{name: a, kind: magic}]\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "sources[0].kind" in err


def test_cli_blend_json(config_path, capsys):
    assert main(["blend", str(config_path), "--user", "7", "--history", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["count"] == 5
    assert {r["name"] for r in out["reports"]} == {"lists", "echo", "pop"}
    assert out["candidates"][0]["ranks"]


def test_cli_blend_table(config_path, capsys):
    assert main(["blend", str(config_path), "--user", "7"]) == 0
    out = capsys.readouterr().out
    assert "candidates in" in out and "lists" in out
