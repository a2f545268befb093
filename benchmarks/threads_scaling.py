"""Do threads scale? ``retrieval bench`` at 1, 2 and 4 threads in one process, beside 2 processes.

    python benchmarks/threads_scaling.py CONFIG --artifacts DIR --events LOG \\
        [--baseline OLD_TREE [--baseline-artifacts OLD_DIR]] [--requests 2000] \\
        [--json-out scaling.json]

Each setting runs in a fresh process (``retrieval bench``, first-request latency included in
its figures after its own warm-up). With ``--baseline``, a checkout of an older commit (``git
worktree add /tmp/old <commit>``), every setting also runs on that code (``PYTHONPATH``), in
alternation with this tree, so old and new are measured in one run on the same machine state:
the JSON holds both side by side. An older tree may not read today's artifacts (the formats
moved): ``--baseline-artifacts`` names a build made by that tree. Each run starts in its tree's
folder and fails unless it imported that tree: ``python -c`` puts the working folder ahead of
``PYTHONPATH``, so a baseline started from this checkout would silently have measured this code
again (``trees.py``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from trees import CLI, add_baseline_arguments, run_in_tree, trees_to_run

SETTINGS = (("1 thread", 1, 1), ("2 threads", 2, 1), ("4 threads", 4, 1), ("2 processes", 1, 2))


def bench(
    args: argparse.Namespace, threads: int, processes: int, tree: Path, artifacts: Path
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [
            "bench",
            str(args.config),
            "--artifacts",
            str(artifacts),
            "--requests",
            str(args.requests),
            "--concurrency",
            str(threads),
            "--processes",
            str(processes),
            "--exact-queries",
            "0",
            "--json-out",
            str(out),
        ]
        if args.events:
            cmd += ["--events", str(args.events)]
        run_in_tree(tree, CLI, cmd, stdout=subprocess.DEVNULL)
        result: dict[str, Any] = json.loads(out.read_text())
    return {
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "blends_per_s": result["qps"],
        "rss_anon_mb": result.get("rss_anon_mb"),
        "sources_p50_ms": {s: v.get("p50_ms") for s, v in result.get("sources", {}).items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--events", type=Path)
    add_baseline_arguments(ap)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    trees = trees_to_run(args)
    figures: dict[str, dict[str, dict]] = {name: {} for name in trees}
    for label, threads, processes in SETTINGS:
        for name, (tree, artifacts) in trees.items():
            figures[name][label] = r = bench(args, threads, processes, tree, artifacts)
            print(
                f"{name:3s} {label:11s}  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                f"{r['blends_per_s']:7.1f} blends/s",
                flush=True,
            )
    doc = {
        "config": str(args.config),
        "artifacts": str(args.artifacts),
        "requests": args.requests,
        "baseline": str(args.baseline) if args.baseline else None,
        "baseline_artifacts": str(trees["old"][1]) if args.baseline else None,
        **figures,
    }
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
