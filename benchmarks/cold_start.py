"""Cold start: is any of the first requests after loading slower than the steady p99?

    python benchmarks/cold_start.py CONFIG --artifacts DIR --events LOG [--runs 3]

Each run is a fresh process: it samples requests, loads the retriever (artifacts prefetched,
kernels compiled or read from numba's cache at import, one warm-up probe per source), then
times the first 10 blends one by one and 1,000 more; it prints the load time, the first
requests' latencies and the steady p50/p99 after them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
import numpy as np
from retrieval import Retriever
from retrieval.config import load_config
from retrieval.tools.bench import sample_requests
t_import = time.perf_counter() - t0
config = load_config(sys.argv[1])
config = config.model_copy(update={"artifacts": Path(sys.argv[2])})
art, log = Path(sys.argv[2]), Path(sys.argv[3])
requests = sample_requests(config, art, log, 1010, seed=int(sys.argv[4]))
t1 = time.perf_counter()
r = Retriever(config)
t_load = time.perf_counter() - t1
lat = []
for q in requests:
    s = time.perf_counter()
    r.blend(q)
    lat.append((time.perf_counter() - s) * 1000)
r.close()
steady = np.array(lat[10:])
print(json.dumps({"import_s": t_import, "load_s": t_load, "first_ms": lat[:10],
                  "steady_p50_ms": float(np.percentile(steady, 50)),
                  "steady_p99_ms": float(np.percentile(steady, 99))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--events", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    for run in range(args.runs):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.config), str(args.artifacts.resolve()),
             str(args.events), str(run)],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        d = json.loads(out.strip().splitlines()[-1])
        first = ", ".join(f"{x:.2f}" for x in d["first_ms"])
        worst = max(d["first_ms"])
        verdict = "slower" if worst > d["steady_p99_ms"] else "not slower"
        print(
            f"run {run}: import {d['import_s']:.2f} s, load {d['load_s']:.2f} s; first 10 blends "
            f"[{first}] ms; steady p50 {d['steady_p50_ms']:.2f} p99 {d['steady_p99_ms']:.2f} ms:"
            f" the worst first request ({worst:.2f} ms) is {verdict} than the p99",
            flush=True,
        )
        time.sleep(0.5)


if __name__ == "__main__":
    main()
