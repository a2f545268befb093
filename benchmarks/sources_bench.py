"""Per-source build time and peak RSS, then per-source retrieve p50/p99, on a synthetic log.

    python benchmarks/sources_bench.py --items 1000000 --events 10000000 [--requests 1000]

Each source is built in its own child process so its peak RSS is its own (os.wait4 rusage),
reading the log included. The retrieve figures call each source directly with k=1000 for users
sampled from the log, with their last 20 events as history, one call at a time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

CONFIG = """
artifacts: {artifacts}
events: {{segments: [country]}}
blend: {{fallback: popular}}
sources:
  - name: covisit
    kind: covisitation
  - name: itemcf
    kind: itemcf
  - name: ann
    kind: ann
  - name: popular
    kind: popularity
    params: {{segments: [country]}}
  - name: recent
    kind: recent
"""


def build_one(config: Path, events: Path, out: Path, name: str) -> None:
    from retrieval.config import load_config
    from retrieval.offline.build import build

    build(load_config(config), events, out, only=[name], progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=0, help="default: items / 5")
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--_build", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._build:
        build_one(*(Path(a) for a in args._build[:3]), args._build[3])
        return

    from retrieval.tools.synth import synthesize

    work = args.workdir or Path(tempfile.mkdtemp(prefix="sources-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "events.parquet"
    users = args.users or max(args.items // 5, 1000)
    t0 = time.perf_counter()
    if not log.exists():
        synthesize(log, n_items=args.items, n_users=users, n_events=args.events, seed=0)
    print(f"log: {args.events:,} events, {args.items:,} items ({time.perf_counter() - t0:.1f}s)")
    cfg = work / "bench.yaml"
    cfg.write_text(textwrap.dedent(CONFIG.format(artifacts=work / "build")))

    print(
        f"{'source':<10} {'build s':>9} {'peak RSS':>10}"
        "   (each in its own process, reading the log included)"
    )
    for name in ("covisit", "itemcf", "ann", "popular"):
        out = work / f"build-{name}"
        t = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--_build", str(cfg), str(log), str(out), name]
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            sys.exit(f"build of {name} failed ({proc.returncode})")
        print(f"{name:<10} {time.perf_counter() - t:>9.1f} {usage.ru_maxrss / 1024:>8.0f} MB")

    # Serve from one directory: merge the per-source builds' folders under one root.
    root = work / "build"
    if root.is_symlink():  # builds are published as a link into .build.builds/
        root.unlink()
    elif root.exists():
        import shutil

        shutil.rmtree(root)
    full = subprocess.run(
        [sys.executable, "-m", "retrieval.tools.cli", "build", str(cfg), "--events", str(log)],
        capture_output=True,
        text=True,
    )
    if full.returncode != 0:
        sys.exit(full.stderr)

    from retrieval import Request, Retriever
    from retrieval.offline.events import read_events
    from retrieval.types import Deadline

    events = read_events(log, segments=["country"])
    rng = np.random.default_rng(1)
    picks = rng.choice(len(events), args.requests, replace=False)
    with Retriever.from_yaml(cfg) as r:
        reqs = []
        for p in picks.tolist():
            u = events.users[p]
            lo = np.searchsorted(events.users, u, side="left")
            hist = events.items[max(lo, p - 19) : p + 1]
            reqs.append(
                Request(
                    user_id=events.user_ids.to_external([u])[0].item(),
                    history=tuple(events.item_ids.to_external(hist).tolist()),
                    context={"country": "US"},
                )
            )
        print(
            f"\n{'source':<10} {'p50 ms':>8} {'p99 ms':>8} {'mean n':>8}"
            f"   ({len(reqs)} requests, k=1000)"
        )
        for src in r.sources:
            lat, counts = [], []
            for q in reqs[:50]:
                src.retrieve(q, 1000, Deadline.in_ms(1000))
            for q in reqs:
                t = time.perf_counter()
                ids, _ = src.retrieve(q, 1000, Deadline.in_ms(1000))
                lat.append((time.perf_counter() - t) * 1000)
                counts.append(len(ids))
            print(
                f"{src.name:<10} {np.percentile(lat, 50):>8.2f} {np.percentile(lat, 99):>8.2f} "
                f"{np.mean(counts):>8.0f}"
            )
        lat = []
        for q in reqs:
            t = time.perf_counter()
            r.blend(q)
            lat.append((time.perf_counter() - t) * 1000)
        print(f"{'blend()':<10} {np.percentile(lat, 50):>8.2f} {np.percentile(lat, 99):>8.2f}")


if __name__ == "__main__":
    main()
