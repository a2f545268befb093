"""Every bad config is an error naming the file, the path inside it and what is allowed."""

import textwrap

import pytest

from retrieval.config import ConfigError, load_config

TOY = "tests.toy_sources:ListSource"


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error_of(tmp_path, text, **kw):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p, **kw)
    msg = str(info.value)
    assert str(p) in msg
    return msg


GOOD = f"""
k: 100
deadline_ms: 40
blend: {{strategy: rrf}}
sources:
  - name: a
    kind: {TOY}
    timeout_ms: 20
    params: {{items: [1, 2, 3]}}
  - name: b
    kind: {TOY}
    weight: 0.5
"""


def test_good_config_resolves_params_model(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.k == 100 and cfg.deadline_ms == 40
    assert cfg.sources[0].resolved_params.items == [1, 2, 3]
    assert cfg.sources[1].source_class.__name__ == "ListSource"
    assert cfg.base_dir == tmp_path.resolve()


def test_defaults(tmp_path):
    cfg = load_config(write(tmp_path, f"sources: [{{name: a, kind: '{TOY}'}}]"))
    assert cfg.k == 1000 and cfg.deadline_ms == 50 and cfg.blend.strategy == "rrf"


def test_unknown_key_lists_allowed(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("weight: 0.5", "wieght: 0.5"))
    assert "sources[1].wieght" in msg and "unknown key" in msg and "weight" in msg


def test_unknown_top_level_key(tmp_path):
    msg = error_of(tmp_path, GOOD + "dedline: 3\n")
    assert "dedline" in msg and "deadline_ms" in msg


def test_wrong_type(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("timeout_ms: 20", "timeout_ms: soon"))
    assert "sources[0].timeout_ms" in msg and "number" in msg and "'soon'" in msg


def test_unknown_kind_lists_kinds(tmp_path):
    msg = error_of(tmp_path, GOOD.replace(f"kind: {TOY}\n    weight", "kind: magic\n    weight"))
    assert "sources[1].kind" in msg and "magic" in msg and "covisitation" in msg
    assert "mypkg.module:MySource" in msg


def test_unimportable_kind(tmp_path):
    msg = error_of(
        tmp_path, GOOD.replace(f"kind: {TOY}\n    weight", "kind: nope.mod:X\n    weight")
    )
    assert "sources[1].kind" in msg and "nope.mod" in msg


def test_bad_params_are_checked_against_the_kind_model(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("items: [1, 2, 3]", "itemz: [1]"))
    assert "sources[0].params.itemz" in msg and "items" in msg


def test_duplicate_names(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("name: b", "name: a"))
    assert "sources[1].name" in msg and "duplicate" in msg and "sources[0]" in msg


def test_bad_identifier(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("name: b", "name: 'B-2'"))
    assert "sources[1].name" in msg and "pattern" in msg


def test_quotas_past_k(tmp_path):
    text = GOOD.replace("timeout_ms: 20", "timeout_ms: 20\n    quota: 80").replace(
        "weight: 0.5", "quota: 30"
    )
    msg = error_of(tmp_path, text)
    assert "quotas sum to 110" in msg and "k (100)" in msg


def test_timeout_above_deadline(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("timeout_ms: 20", "timeout_ms: 45"))
    assert "sources[0].timeout_ms" in msg and "deadline_ms" in msg and "at most 40" in msg


def test_empty_source_list(tmp_path):
    msg = error_of(tmp_path, "sources: []\n")
    assert "sources" in msg and "at least one source" in msg


def test_missing_sources(tmp_path):
    msg = error_of(tmp_path, "k: 10\n")
    assert "sources" in msg and "missing" in msg


def test_not_yaml(tmp_path):
    msg = error_of(tmp_path, "sources: [a, b\nk: : :\n")
    assert "not valid YAML" in msg and "line" in msg


def test_yaml_that_is_not_a_mapping(tmp_path):
    msg = error_of(tmp_path, "- just\n- a list\n")
    assert "mapping" in msg


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_bad_strategy(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("strategy: rrf", "strategy: magic"))
    assert "blend.strategy" in msg and "'quota'" in msg


def test_unknown_fallback(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("strategy: rrf", "strategy: rrf, fallback: pop"))
    assert "blend.fallback" in msg and "'pop'" in msg and "a, b" in msg


def test_several_problems_reported_at_once(tmp_path):
    text = GOOD.replace("timeout_ms: 20", "timeout_ms: 45").replace("name: b", "name: a")
    msg = error_of(tmp_path, text)
    assert "2 problems" in msg


def test_environment_variables(tmp_path):
    text = GOOD + "store: {kind: memory, prefix: '${PREFIX:-cr}'}\n"
    assert load_config(write(tmp_path, text), environ={}).store.prefix == "cr"
    assert load_config(write(tmp_path, text), environ={"PREFIX": "prod"}).store.prefix == "prod"
    text = GOOD + "store: {kind: redis, url: '${REDIS_URL}'}\n"
    msg = error_of(tmp_path, text, environ={})
    assert "store.url" in msg and "REDIS_URL is not set" in msg
    cfg = load_config(write(tmp_path, text), environ={"REDIS_URL": "redis://h:1/0"})
    assert cfg.store.url == "redis://h:1/0"
