"""Run code on one checkout of this project, so old and new are measured in one run.

``python -c`` puts the working folder ahead of ``PYTHONPATH``: a baseline started from this
checkout's folder would import this checkout again and compare the new code with itself.
``run_in_tree`` starts in the tree's own folder and exits unless ``retrieval`` came from it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
"""This checkout."""

# Exits unless ``retrieval`` was imported from the tree given as argv[1], then drops it.
_CHECK = (
    "import sys; from pathlib import Path; import retrieval; "
    "got = Path(retrieval.__file__).resolve().parents[1]; "
    "sys.exit(f'imported {got}, expected {sys.argv[1]}') if str(got) != sys.argv[1] else None; "
    "del sys.argv[1]\n"
)

CLI = "from retrieval.tools.cli import main; raise SystemExit(main())"
"""Code that runs ``retrieval`` with the arguments given."""


def run_in_tree(
    tree: Path,
    code: str,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess[Any]:
    """``python -c code *args`` on ``tree``'s code (``check=True``; ``kwargs`` go to
    ``subprocess.run``). Paths in ``args`` must be absolute: it runs in ``tree``'s folder."""
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONPATH"] = str(tree) + os.pathsep + full_env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", _CHECK + code, str(tree), *args]
    return subprocess.run(cmd, env=full_env, cwd=tree, check=True, **kwargs)


def add_baseline_arguments(ap: argparse.ArgumentParser) -> None:
    """``--baseline OLD_TREE`` and ``--baseline-artifacts OLD_DIR``: older code may not read
    today's artifacts (the formats moved), so it can serve a build of its own."""
    ap.add_argument("--baseline", type=Path, help="a checkout of the code to compare against")
    ap.add_argument(
        "--baseline-artifacts", type=Path, help="the baseline's own build (default: --artifacts)"
    )


def trees_to_run(args: argparse.Namespace) -> dict[str, tuple[Path, Path]]:
    """``new`` (this checkout) and, with ``--baseline``, ``old``: each tree and the build it
    serves. The path arguments are made absolute first: each run starts in its tree's folder."""
    for name in ("config", "artifacts", "events", "baseline_artifacts"):
        if getattr(args, name, None) is not None:
            setattr(args, name, getattr(args, name).resolve())
    runs = {"new": (HERE, args.artifacts)}
    if args.baseline:
        runs["old"] = (args.baseline.resolve(), args.baseline_artifacts or args.artifacts)
    return runs
