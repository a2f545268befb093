"""10 million items end to end: synthesize, build every source (faiss for ANN), bench, summarize.

    nohup python examples/large_catalog.py --workdir /data/large > large.log 2>&1 &
    python examples/large_catalog.py --items 1000000 --events 10000000 --workdir /tmp/large-1m

Resumable: every step whose output exists is skipped (delete a step's output to redo it), so
an interrupted run picks up where it stopped. Every source builds in one ``retrieval build``
process, as a user builds: the log is read once, each source's time is its own build step's,
and the peak RSS is the whole build's (the log's columns included). The bench runs in a fresh
process so its RSS is what a serving process holds: at concurrency 1 (latency, exact-search
reference, ANN recall), then at concurrency 2 as two threads in one process and as two
processes of one thread each (throughput: the GIL lets one process use about one core). ANN
indexes the synthetic two-tower embeddings (32-d): ALS on 100M events would dominate the
build.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

CONFIG = """
k: 1000
deadline_ms: 50
artifacts: build
events: {{segments: [country]}}
blend: {{fallback: popular}}
sources:
  - name: covisit
    kind: covisitation
    timeout_ms: 30
  - name: itemcf
    kind: itemcf
    timeout_ms: 30
  - name: ann
    kind: ann
    timeout_ms: 30
    params:
      embeddings: {emb}
      embedding_ids: {emb_ids}
      backend: faiss
      metric: angular
  - name: popular
    kind: popularity
    timeout_ms: 10
    params: {{segments: [country]}}
"""


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(
    cmd: list[str], what: str, heartbeat_s: float = 30.0, stdout: Path | None = None
) -> tuple[float, float]:
    """Run a child to completion: (seconds, its peak RSS in MB). Says how it is doing every
    ``heartbeat_s`` (elapsed time, RSS), so a log of a background run shows progress."""
    t0 = time.perf_counter()
    with open(stdout, "w") if stdout else contextlib.nullcontext() as out:
        proc = subprocess.Popen(cmd, stdout=out)
        next_beat = t0 + heartbeat_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.2)
            if time.perf_counter() >= next_beat:
                next_beat += heartbeat_s
                rss = _rss_mb(proc.pid)
                say(f"{what}: {time.perf_counter() - t0:.0f}s so far, RSS {rss:.0f} MB")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024.0


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=10_000_000)
    ap.add_argument("--events", type=int, default=100_000_000)
    ap.add_argument("--users", type=int, default=0, help="default: items / 5")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--workdir", type=Path, default=Path("large-catalog"))
    args = ap.parse_args()
    began = time.perf_counter()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    summary_path = work / "summary.json"
    summary: dict[str, Any] = (
        json.loads(summary_path.read_text()) if summary_path.exists() else {"build": {}}
    )
    summary.update(items=args.items, events=args.events)

    def save() -> None:
        summary_path.write_text(json.dumps(summary, indent=2))

    log = work / "events.parquet"
    if not log.exists():
        say(f"synthesizing {args.events:,} events over {args.items:,} items ...")
        users = args.users or max(args.items // 5, 1000)
        code = (
            "import sys; from pathlib import Path; from retrieval.tools.synth import synthesize; "
            f"synthesize(Path('{work}/events.tmp.parquet'), n_items={args.items}, "
            f"n_users={users}, n_events={args.events}, seed=0, progress=True)"
        )
        seconds, peak = run([sys.executable, "-c", code], "synthesize")
        for suffix in ("items.parquet", "embeddings.npy", "embedding_ids.npy"):
            (work / f"events.tmp.{suffix}").rename(work / f"events.{suffix}")
        (work / "events.tmp.parquet").rename(log)
        summary["synth"] = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak)}
        save()
    say(f"log: {log} ({log.stat().st_size / 1e9:.2f} GB)")
    cfg = work / "large.yaml"
    cfg.write_text(
        textwrap.dedent(
            CONFIG.format(
                emb=work / "events.embeddings.npy", emb_ids=work / "events.embedding_ids.npy"
            )
        )
    )
    artifacts = work / "build"
    if (artifacts / "manifest.json").exists():
        say(f"built already ({summary['build']})")
    else:
        say("building every source ...")
        cmd = [sys.executable, "-m", "retrieval.tools.cli", "build", str(cfg), "--events", str(log)]
        report = work / "build.json"
        seconds, peak = run([*cmd, "--out", str(artifacts), "--json"], "build", stdout=report)
        rows = json.loads(report.read_text())["sources"]
        steps = {r["name"]: round(r["seconds"], 1) for r in rows}
        summary["build"] = {
            "seconds": round(seconds, 1),
            "peak_rss_mb": round(peak),
            "read_and_write_s": round(seconds - sum(steps.values()), 1),
            "sources_s": steps,
        }
        say(f"build: {seconds:.0f}s, peak RSS {peak:.0f} MB")
        save()
    # (name, threads per process, processes)
    for name, threads, procs in (("c1", 1, 1), ("c2", 2, 1), ("p2", 1, 2)):
        out = work / f"bench-{name}.json"
        if not out.exists():
            say(f"bench {name}: {procs} process(es) x {threads} thread(s) ...")
            cmd = [sys.executable, "-m", "retrieval.tools.cli", "bench", str(cfg)]
            cmd += ["--artifacts", str(artifacts), "--events", str(log)]
            cmd += ["--requests", str(args.requests), "--json-out", str(out)]
            cmd += ["--concurrency", str(threads), "--processes", str(procs)]
            cmd += ["--exact-queries", "200" if name == "c1" else "0"]
            seconds, peak = run(cmd, f"bench {name}")
            summary[f"bench_{name}_process"] = {"seconds": round(seconds, 1), "peak_rss_mb": peak}
        summary[f"bench_{name}"] = json.loads(out.read_text())
        save()
    disk = sum(p.stat().st_size for p in artifacts.rglob("*") if p.is_file())
    summary["artifacts_gb"] = round(disk / 1e9, 2)
    summary["this_run_s"] = round(time.perf_counter() - began, 1)
    save()
    b1, b2, p2 = summary["bench_c1"], summary["bench_c2"], summary["bench_p2"]
    built = summary["build"]
    print(f"\n== {args.items:,} items, {args.events:,} events ({summary_path})")
    if "synth" in summary:
        print(f"synthesize: {summary['synth']['seconds']:.0f}s")
    for name, seconds in built["sources_s"].items():
        print(f"build {name:<10} {seconds:>7.0f}s")
    print(f"build read+write {built['read_and_write_s']:>5.0f}s")
    gb = summary["artifacts_gb"]
    print(
        f"build total {built['seconds']:.0f}s, peak RSS {built['peak_rss_mb']:.0f} MB, "
        f"artifacts {gb} GB"
    )
    print(
        f"serving RSS after warm-up {b1['rss_mb']:.0f} MB; blend p50 {b1['p50_ms']:.2f} ms "
        f"p99 {b1['p99_ms']:.2f} ms (concurrency 1)"
    )
    print(
        f"concurrency 2: {b2['qps']:.0f} blends/s as 2 threads (p99 {b2['p99_ms']:.2f} ms), "
        f"{p2['qps']:.0f} blends/s as 2 processes (p99 {p2['p99_ms']:.2f} ms, private "
        f"{p2['rss_anon_mb']:.0f} MB in both)"
    )
    e = b1.get("exact") or {}
    if e.get("queries"):
        recall = e[f"recall_at_{e['k']}"]
        print(
            f"ANN ({e['backend']}) recall@{e['k']} {recall:.3f}, p99 "
            f"{e['ann_p99_ms']:.2f} ms; exact search p99 {e['exact_p99_ms']:.1f} ms"
        )
    for name, s in b1["sources"].items():
        print(
            f"  {name:<10} p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms  "
            f"timeouts {s['timeouts']}  errors {s['errors']}"
        )


if __name__ == "__main__":
    main()
