"""The command line's conventions: help and an example for every command and argument,
``--version``, one ``--json`` meaning (the result as JSON on stdout), results on stdout and
progress on stderr."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from retrieval import __version__
from retrieval.tools.cli import build_parser, main

CONFIG = """
k: 5
deadline_ms: 2000
store: {kind: memory}
sources:
  - name: lists
    kind: tests.toy_sources:ListSource
    params: {items: [1, 2, 3, 4, 5, 6]}
  - name: more
    kind: tests.toy_sources:ListSource
    params: {items: [7, 8]}
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


COMMANDS = sorted(_subparsers(build_parser()))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(textwrap.dedent(CONFIG))
    return p


def test_every_command_is_there() -> None:
    expected = {"validate", "blend", "synth", "eval", "tune", "calibrate", "build", "push"}
    assert expected | {"bench", "doctor", "serve", "loadtest"} == set(COMMANDS)


def test_top_level_help_lists_commands_exit_codes_and_an_example(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for choice in sub._choices_actions:  # the one-line help of each command
        assert choice.help, choice.dest
        assert f"    {choice.dest}" in out
    assert "exit codes:" in out
    assert any(line.strip().startswith("retrieval ") for line in out.splitlines())
    assert "--json" in out and "stderr" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_exits_0_with_help_for_every_argument_and_an_example(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: retrieval {command}" in capsys.readouterr().out
    parser = _subparsers(build_parser())[command]
    assert parser.description and parser.description.strip()
    assert isinstance(parser.formatter_class, type)
    assert issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{command} {action.option_strings}"
    examples = [
        line.strip() for line in (parser.epilog or "").splitlines() if line.startswith("  ")
    ]
    assert any(
        e.startswith(f"retrieval {command} ") or e == f"retrieval {command}" for e in examples
    )
    assert all(e.startswith(("retrieval ", "--")) for e in examples), examples


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "serve"])
def test_json_is_a_flag_in_every_command(command: str) -> None:
    parser = _subparsers(build_parser())[command]
    (json_flag,) = (a for a in parser._actions if "--json" in a.option_strings)
    assert json_flag.nargs == 0 and json_flag.const is True  # store_true: never a path
    for action in parser._actions:
        if "--json-out" in action.option_strings:
            assert action.metavar == "PATH"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"retrieval {__version__}\n"


def test_validate_json_and_yaml_say_the_same(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(config), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["k"] == 5 and [s["name"] for s in data["sources"]] == ["lists", "more"]
    assert "ok (2 sources)" in captured.err and "ok (" not in captured.out
    assert main(["validate", str(config)]) == 0  # without --json: the same, as YAML
    assert yaml.safe_load(capsys.readouterr().out) == data


def test_blend_json(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blend", str(config), "--user", "7", "--history", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["count"] == 5
    assert {r["name"] for r in data["reports"]} == {"lists", "more"}


def test_synth_progress_stays_off_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As on a terminal: the progress bar is drawn, on stderr.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    log = tmp_path / "log.parquet"
    args = ["synth", "--items", "300", "--users", "100", "--events", "2000", "--out", str(log)]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    stats = json.loads(captured.out)  # nothing but the JSON document
    assert stats["n_events"] == 2000 and stats["events_path"] == str(log)
    assert "ev" in captured.err  # tqdm's bar (unit "ev") went to stderr
    assert main(args) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()  # without --json: the summary and the paths, only
    assert lines[0].startswith("wrote 2,000 events") and len(lines) == 5
    assert all("|" not in line and "\r" not in line for line in lines)


def test_build_json_on_stdout_and_its_log_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from retrieval.tools.synth import synthesize

    log = tmp_path / "log.parquet"
    synthesize(log, n_items=300, n_users=100, n_events=2000, seed=3)
    cfg = tmp_path / "pop.yaml"
    cfg.write_text("k: 10\nartifacts: build\nsources:\n  - {name: popular, kind: popularity}\n")
    assert main(["build", str(cfg), "--events", str(log), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [s["name"] for s in data["sources"]] == ["popular"] and data["events"] == 2000
    assert "built 1 sources" in captured.err and "built" not in captured.out
