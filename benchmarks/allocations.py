"""Heap allocations per blend: how many objects and buffers one ``blend()`` allocates.

    python benchmarks/allocations.py CONFIG --artifacts DIR --events LOG [--blends 2000] \\
        [--baseline OLD_TREE [--baseline-artifacts OLD_DIR]] [--json-out allocations.json]

Python's small-object allocator hides most allocations from the C library, so each run is a
fresh interpreter with ``PYTHONMALLOC=malloc`` (every object, frame-free call and numpy buffer
then goes through ``malloc``) and a 20-line counter preloaded (``LD_PRELOAD``), compiled here
with the system C compiler (``cc``; Linux with glibc). It loads the retriever, warms up with
300 blends, then counts the calls to malloc, calloc and realloc, and their bytes, over
``--blends`` more, one at a time: everything the blend's threads allocate, divided by the
blends. With ``--baseline`` an older checkout runs the same way right after (``trees.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

from trees import add_baseline_arguments, run_in_tree, trees_to_run

COUNTER_C = r"""
#include <stdatomic.h>
#include <stddef.h>
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
static atomic_long calls, bytes;
static void count(size_t n) {
    atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&bytes, (long)n, memory_order_relaxed);
}
void *malloc(size_t n) { count(n); return __libc_malloc(n); }
void *calloc(size_t m, size_t n) { count(m * n); return __libc_calloc(m, n); }
void *realloc(void *p, size_t n) { count(n); return __libc_realloc(p, n); }
long alloc_calls(void) { return atomic_load(&calls); }
long alloc_bytes(void) { return atomic_load(&bytes); }
"""

CHILD = r"""
import ctypes, json, sys
from pathlib import Path
from retrieval.config import load_config
from retrieval.online.retriever import Retriever
from retrieval.tools.bench import sample_requests

config_path, artifacts, events, n, out = sys.argv[1:6]
lib = ctypes.CDLL(None)  # the preloaded counter's symbols
calls, nbytes = lib.alloc_calls, lib.alloc_bytes
calls.restype = nbytes.restype = ctypes.c_long
config = load_config(config_path).model_copy(update={"artifacts": Path(artifacts)})
requests = sample_requests(config, Path(artifacts), Path(events), int(n) + 300)
with Retriever(config) as retriever:
    for request in requests[:300]:
        retriever.blend(request)
    timed = requests[300:]
    c0, b0 = calls(), nbytes()
    for request in timed:
        retriever.blend(request)
    c1, b1 = calls(), nbytes()
Path(out).write_text(json.dumps({
    "blends": len(timed),
    "allocations_per_blend": round((c1 - c0) / len(timed), 1),
    "kb_per_blend": round((b1 - b0) / len(timed) / 1024, 1),
}))
"""


def measure(args: argparse.Namespace, tree: Path, artifacts: Path, counter: Path) -> dict:
    env = dict(os.environ, PYTHONMALLOC="malloc", LD_PRELOAD=str(counter))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "allocations.json"
        cmd = [str(args.config), str(artifacts), str(args.events), str(args.blends), str(out)]
        run_in_tree(tree, CHILD, cmd, env=env, stdout=subprocess.DEVNULL)
        result: dict = json.loads(out.read_text())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config", type=Path)
    ap.add_argument("--artifacts", type=Path, required=True)
    ap.add_argument("--events", type=Path, required=True)
    ap.add_argument("--blends", type=int, default=2000)
    add_baseline_arguments(ap)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    runs = trees_to_run(args)
    doc: dict = {"config": str(args.config), "blends": args.blends}
    with tempfile.TemporaryDirectory() as tmp:
        source, counter = Path(tmp) / "counter.c", Path(tmp) / "counter.so"
        source.write_text(COUNTER_C)
        build = ["cc", "-O2", "-shared", "-fPIC", "-o", str(counter), str(source)]
        subprocess.run(build, check=True)
        for name, (tree, artifacts) in runs.items():
            doc[name] = r = measure(args, tree, artifacts, counter)
            print(
                f"{name:3s} {r['allocations_per_blend']:9.1f} allocations, "
                f"{r['kb_per_blend']:8.1f} KiB a blend ({tree})",
                flush=True,
            )
    if args.json_out:
        args.json_out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
