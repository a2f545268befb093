"""Hostile and careless configs: each fails fast, with every problem listed and no secret shown."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from retrieval.config import ConfigError, RetrievalConfig, load_config
from retrieval.errors import ArtifactError, InputError, StoreError
from retrieval.redact import redact, redact_text, secrets_of
from retrieval.tools.cli import main
from retrieval.types import DEFAULT_EVENT_WEIGHTS

TOY = "tests.toy_sources:ListSource"
ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error_of(tmp_path: Path, text: str, **kw: object) -> ConfigError:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p, **kw)  # type: ignore[arg-type]
    assert str(p) in str(info.value)
    return info.value


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Turn a hang into a failure (the old code expanded a billion aliases)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


GOOD = f"""
k: 100
deadline_ms: 40
sources:
  - name: a
    kind: {TOY}
    timeout_ms: 20
    params: {{items: [1, 2, 3]}}
"""


def test_config_error_is_an_input_error() -> None:
    assert issubclass(ConfigError, InputError) and issubclass(ConfigError, ValueError)
    err = ConfigError("f.yaml", [("k", "bad")])
    assert err.origin == "f.yaml" and err.problems == [("k", "bad")]


# -- 1. billion laughs -------------------------------------------------------------------------


def billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]")
        prev = name
    lines.append(f"sources: [{{name: x, kind: '{TOY}', params: {{items: *i}}}}]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    p = write(tmp_path, billion_laughs())
    t0 = time.perf_counter()
    with time_limit(5), pytest.raises(ConfigError) as info:
        load_config(p)
    assert time.perf_counter() - t0 < 1.0
    msg = str(info.value)
    assert str(p) in msg and "line 1" in msg and "anchors" in msg


def test_billion_laughs_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write(tmp_path, billion_laughs())
    t0 = time.perf_counter()
    with time_limit(5):
        assert main(["validate", str(p)]) == 2
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not allowed" in err


def test_aliases_and_anchors_are_refused_even_when_small(tmp_path: Path) -> None:
    text = f"""
    base: &base {{kind: '{TOY}'}}
    sources: [{{name: a, kind: '{TOY}'}}]
    """
    msg = str(error_of(tmp_path, text))
    assert "anchors (&base)" in msg and "line 2" in msg
    # An alias to an anchor the loader never saw is refused too, naming its line.
    msg = str(error_of(tmp_path, f"k: 5\nsources: [{{name: a, kind: '{TOY}'}}]\nx: *nowhere\n"))
    assert "aliases (*nowhere)" in msg and "line 3" in msg


def test_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    msg = str(error_of(tmp_path, "k: " + "[" * 20_000 + "]" * 20_000 + "\n"))
    assert "nested too deeply" in msg or "not valid YAML" in msg


def test_env_substitution_still_works_in_strings(tmp_path: Path) -> None:
    text = GOOD + "store: {kind: memory, prefix: '${PREFIX:-cr}'}\nartifacts: '${ART}'\n"
    cfg = load_config(write(tmp_path, text), environ={"PREFIX": "p1", "ART": "${PREFIX}"})
    assert cfg.store.prefix == "p1"
    assert cfg.artifacts == Path("${PREFIX}")  # a value is not expanded again


# -- 2. strict scalars and duplicate keys -------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "path"),
    [
        (("k: 100", "k: true"), "k"),
        (("k: 100", "k: '100'"), "k"),
        (("k: 100", "k: 100.0"), "k"),
        (("timeout_ms: 20", "timeout_ms: 20\n    quota: true"), "sources[0].quota"),
        (("timeout_ms: 20", "timeout_ms: 20\n    required: 1"), "sources[0].required"),
        (("timeout_ms: 20", "timeout_ms: 20\n    weight: .inf"), "sources[0].weight"),
        (("timeout_ms: 20", "timeout_ms: 20\n    weight: true"), "sources[0].weight"),
        (("timeout_ms: 20", "timeout_ms: .nan"), "sources[0].timeout_ms"),
        (("deadline_ms: 40", "deadline_ms: .inf"), "deadline_ms"),
        (("k: 100", "k: 100\nblend: {rrf_k: .inf}"), "blend.rrf_k"),
        (("k: 100", "k: 100\nblend: {exclude_seen: 'no'}"), "blend.exclude_seen"),
        (("k: 100", "k: 100\nstore: {history_len: 1.5}"), "store.history_len"),
        (("items: [1, 2, 3]", "items: [1], delay_ms: .inf"), "sources[0].params.delay_ms"),
        (("k: 100", "k: 100\nevents: {weights: {click: .inf}}"), "events.weights.click"),
    ],
)
def test_sloppy_scalars_are_refused(tmp_path: Path, change: tuple[str, str], path: str) -> None:
    old, new = change
    assert old in GOOD
    err = error_of(tmp_path, GOOD.replace(old, new, 1))
    assert path in [p for p, _ in err.problems], err.problems


def test_an_int_is_still_a_float(tmp_path: Path) -> None:
    text = GOOD.replace("timeout_ms: 20", "timeout_ms: 20\n    weight: 2")
    cfg = load_config(write(tmp_path, text + "blend: {rrf_k: 10}\n"))
    assert cfg.sources[0].weight == 2.0 and isinstance(cfg.sources[0].weight, float)
    assert cfg.blend.rrf_k == 10.0 and cfg.deadline_ms == 40.0


def test_duplicate_keys_are_refused_naming_key_and_line(tmp_path: Path) -> None:
    msg = str(error_of(tmp_path, GOOD + "k: 5\n"))
    assert "duplicate key 'k'" in msg and "line 9" in msg and "first on line 2" in msg
    nested = GOOD.replace("params: {items: [1, 2, 3]}", "params: {items: [1], items: [2]}")
    msg = str(error_of(tmp_path, nested))
    assert "duplicate key 'items'" in msg and "line 8" in msg


def test_duplicate_keys_are_listed_with_the_other_problems(tmp_path: Path) -> None:
    err = error_of(tmp_path, GOOD.replace("k: 100", "k: 0") + "deadline_ms: 30\n")
    msgs = [m for _, m in err.problems]
    assert any("duplicate key 'deadline_ms'" in m for m in msgs)
    assert "k" in [p for p, _ in err.problems]


# -- 3. abstract plugin classes, broken plugin modules ------------------------------------------


def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    name = f"hostile_plugin_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_an_abstract_source_class_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = plugin(
        tmp_path,
        monkeypatch,
        """
        from sources.base import Source

        class AbstractSource(Source):
            '''Forgot retrieve().'''
        """,
    )
    err = error_of(tmp_path, f"sources: [{{name: a, kind: '{mod}:AbstractSource'}}]\n")
    (path, msg) = err.problems[0]
    assert path == "sources[0].kind" and "abstract" in msg and "retrieve" in msg


def test_a_plugin_with_a_syntax_error_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mod = plugin(tmp_path, monkeypatch, "x = 1\n\ndef broken(:\n    pass\n")
    p = write(tmp_path, f"sources: [{{name: a, kind: '{mod}:X'}}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    (path, msg) = info.value.problems[0]
    assert path == "sources[0].kind" and mod in msg and "line 3" in msg and "syntax" in msg
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{mod}.py, line 3" in err


def test_a_plugin_that_raises_at_import_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = plugin(tmp_path, monkeypatch, "import os\nraise RuntimeError('no GPU here')\n")
    err = error_of(tmp_path, f"sources: [{{name: a, kind: '{mod}:X'}}]\n")
    (path, msg) = err.problems[0]
    assert path == "sources[0].kind" and "no GPU here" in msg and "line 2" in msg


# -- 4. every problem at once ------------------------------------------------------------------


def test_a_shape_error_does_not_hide_the_other_problems(tmp_path: Path) -> None:
    text = f"""
    k: true
    sources:
      pop:
        kind: '{TOY}'
        params: {{itemz: [1]}}
      ok:
        kind: '{TOY}'
        weight: -1
    """
    err = error_of(tmp_path, text)
    paths = [p for p, _ in err.problems]
    assert "k" in paths
    assert "sources" in paths and "a list of sources" in dict(err.problems)["sources"]
    assert "sources.pop.params.itemz" in paths  # the params still checked against the kind
    assert "sources.ok.weight" in paths


def test_sources_that_parse_are_resolved_and_cross_checked(tmp_path: Path) -> None:
    text = f"""
    k: 10
    deadline_ms: 40
    blend: {{strategy: magic}}
    sources:
      - {{name: a, kind: '{TOY}', weight: -1}}
      - {{name: b, kind: '{TOY}', params: {{itemz: 1}}, timeout_ms: 45}}
      - {{name: b, kind: nope.mod:X, quota: 11}}
    """
    err = error_of(tmp_path, text)
    paths = [p for p, _ in err.problems]
    assert "blend.strategy" in paths
    assert "sources[0].weight" in paths
    assert "sources[1].params.itemz" in paths
    assert "sources[1].timeout_ms" in paths  # cross check on a source that parsed
    assert "sources[2].kind" in paths
    assert "sources[2].name" in paths  # duplicate of sources[1]
    assert any("quotas sum to 11" in m for _, m in err.problems)


def test_a_failed_field_skips_the_checks_that_read_it(tmp_path: Path) -> None:
    # deadline_ms is bad: no timeout check against a made-up default, but k still checked.
    text = GOOD.replace("deadline_ms: 40", "deadline_ms: soon").replace("k: 100", "k: -1")
    err = error_of(tmp_path, text)
    assert sorted(p for p, _ in err.problems) == ["deadline_ms", "k"]


# -- 5. no secret in any message ---------------------------------------------------------------

SECRETS = ["pa/ss-w0rd", "pa?ss-w0rd", "pa#ss-w0rd", "p@ss-w0rd", "a/b?c#d@e-w0rd"]


def leaks(text: str, secret: str) -> bool:
    parts = {secret, "w0rd", "ss-w", "e-w0"}
    return any(p in text for p in parts)


@pytest.mark.parametrize("secret", SECRETS)
def test_redact_hides_passwords_with_url_delimiters(secret: str) -> None:
    for url in (
        f"redis://user:{secret}@host:6379/0",
        f"rediss://{secret}@host:6380",
        f"redis://host:6379/0?password={secret}",
    ):
        shown = redact(url)
        assert not leaks(shown, secret), shown
        assert "host" in shown
        assert secret in secrets_of(url)
    assert redact(f"redis://user:{secret}@host:6379/0") == "redis://user:***@host:6379/0"
    msg = f"bad (got 'redis://u:{secret}@h:1/0'), and redis://h:2"
    assert not leaks(redact_text(msg), secret) and "redis://h:2" in redact_text(msg)


@pytest.mark.parametrize("secret", SECRETS)
def test_a_store_url_given_as_the_store_itself_is_not_echoed(
    tmp_path: Path, secret: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://user:{secret}@host:6379/0"
    env = {"REDIS_URL": url}
    text = GOOD + "store: ${REDIS_URL}\n"
    err = error_of(tmp_path, text, environ=env)
    assert "store" in [p for p, _ in err.problems]
    assert not leaks(str(err), secret), str(err)
    # The same URL pasted into a field of another type, or as a key, is redacted too.
    err = error_of(tmp_path, GOOD.replace("k: 100", "k: ${REDIS_URL}"), environ=env)
    assert "k" in [p for p, _ in err.problems] and not leaks(str(err), secret), str(err)
    text = GOOD + "store: {kind: redis, url: '${REDIS_URL}', prefix: '${REDIS_URL}'}\n"
    err = error_of(tmp_path, text, environ=env)
    assert "store.prefix" in [p for p, _ in err.problems] and not leaks(str(err), secret)
    text = GOOD + f"store: {{kind: redis, '{url}': 1}}\n"
    err = error_of(tmp_path, text)
    assert not leaks(str(err), secret), str(err)


@pytest.mark.parametrize("secret", SECRETS)
def test_validate_prints_no_password(
    tmp_path: Path, secret: str, capsys: pytest.CaptureFixture[str]
) -> None:
    p = write(tmp_path, GOOD + "store: {kind: redis, url: '${REDIS_URL}'}\n")
    url = f"redis://user:{secret}@host:6379/0"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDIS_URL", url)
        mp.delenv("RETRIEVAL_REDIS_URL", raising=False)
        assert main(["validate", str(p)]) == 0
    out = capsys.readouterr()
    assert not leaks(out.out + out.err, secret) and "user:***@host:6379/0" in out.out


# -- 6. no traceback for careless input ---------------------------------------------------------


def test_context_without_equals_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = write(tmp_path, GOOD)
    with pytest.raises(SystemExit) as exit_:
        main(["blend", str(p), "--user", "1", "--context", "country"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--context" in err and "KEY=VALUE" in err and "'country'" in err
    assert "Traceback" not in err


def test_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    # Enough output to fill the pipe, so the write fails once the reader has gone.
    items = ", ".join(str(i) for i in range(40_000))
    p = write(tmp_path, GOOD.replace("items: [1, 2, 3]", f"items: [{items}]"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "retrieval.tools.cli", "validate", str(p)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # like `| head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    code = proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert code == 128 + signal.SIGPIPE


# -- 7. exit codes by class ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InputError("bad id"), 2),
        (ArtifactError("stale build"), 3),
        (StoreError("redis down"), 4),
        (FileNotFoundError("nope.csv"), 2),
    ],
)
def test_errors_of_the_tree_map_to_their_exit_codes(
    exc: Exception,
    code: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def handler(args: object) -> int:
        raise exc

    monkeypatch.setattr("retrieval.tools.cli._validate", handler)
    assert main(["validate", str(tmp_path / "x.yaml")]) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_an_unexpected_value_error_is_a_bug_with_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def handler(args: object) -> int:
        raise ValueError("operands could not be broadcast (redis://u:hunter22@h)")

    monkeypatch.setattr("retrieval.tools.cli._validate", handler)
    assert main(["validate", str(tmp_path / "x.yaml")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "operands could not be broadcast" in err
    assert "hunter22" not in err and "bug" in err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for code in ("0", "1", "2", "3", "4", str(128 + signal.SIGPIPE)):
        assert f"\n  {code} " in out


# -- 8. limits, merge reserve, the one event-weight table ----------------------------------------


def test_limits_defaults_and_bounds(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert (cfg.limits.max_exclude, cfg.limits.max_seed_items, cfg.limits.max_history) == (
        10_000,
        1_000,
        1_000,
    )
    cfg = load_config(write(tmp_path, GOOD + "limits: {max_exclude: 0, max_history: 5}\n"))
    assert cfg.limits.max_exclude == 0 and cfg.limits.max_history == 5
    bad = "limits: {max_exclude: -1, max_seed_items: 0, max_history: 0, max_users: 3}\n"
    err = error_of(tmp_path, GOOD + bad)
    assert sorted(p for p, _ in err.problems) == [
        "limits.max_exclude",
        "limits.max_history",
        "limits.max_seed_items",
        "limits.max_users",
    ]
    for name in ("max_exclude", "max_seed_items", "max_history"):
        assert type(cfg.limits).model_fields[name].description


@pytest.mark.parametrize("reserve", ["40", "45.5"])
def test_merge_reserve_must_be_below_the_deadline(tmp_path: Path, reserve: str) -> None:
    err = error_of(tmp_path, GOOD + f"blend: {{merge_reserve_ms: {reserve}}}\n")
    (path, msg) = err.problems[0]
    assert path == "blend.merge_reserve_ms" and "deadline_ms (40)" in msg
    assert load_config(write(tmp_path, GOOD + "blend: {merge_reserve_ms: 39.9}\n"))


def test_event_weights_default_and_bounds(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, GOOD)).events.weights == DEFAULT_EVENT_WEIGHTS
    err = error_of(tmp_path, GOOD + "events: {weights: {click: -1, order: .nan}}\n")
    assert sorted(p for p, _ in err.problems) == ["events.weights.click", "events.weights.order"]


def test_events_weights_fill_the_sources_that_take_event_weights() -> None:
    doc = {
        "events": {"weights": {"click": 2, "order": 9.5}},
        "sources": [
            {"name": "pop", "kind": "popularity"},
            {"name": "own", "kind": "popularity", "params": {"event_weights": {"cart": 1}}},
            {"name": "toy", "kind": TOY},
        ],
    }
    cfg = RetrievalConfig.load(doc)
    assert cfg.source("pop").resolved_params.event_weights == {"click": 2.0, "order": 9.5}  # type: ignore[attr-defined]
    assert cfg.source("own").resolved_params.event_weights == {"cart": 1.0}  # type: ignore[attr-defined]
    assert cfg.source("pop").params == {}  # what the user wrote is kept as written
    default = RetrievalConfig.load({"sources": doc["sources"][:1]})
    assert default.source("pop").resolved_params.event_weights == DEFAULT_EVENT_WEIGHTS  # type: ignore[attr-defined]
    again = RetrievalConfig.load(cfg.model_dump(mode="json"))  # tune and eval reload dumps
    assert again.source("pop").resolved_params == cfg.source("pop").resolved_params
