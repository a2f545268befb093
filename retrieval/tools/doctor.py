"""``retrieval doctor``: what this machine gives the retriever, and the traps it sets.

Thread oversubscription (BLAS or OpenMP pools multiplying the blender's threads) is implicit's
users' most common performance complaint, annoy is compiled with ``-march=native`` (an image
built elsewhere may die with "illegal instruction"), and the fan-out only pays off if the ANN
libraries release the GIL: this prints all three, the last one measured, not assumed.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.artifacts import ArtifactError
from sources.ann_faiss import require_faiss

__all__ = ["LIBRARIES", "doctor", "doctor_sections", "format_doctor", "gil_speedup"]

LIBRARIES = (
    "numpy",
    "scipy",
    "implicit",
    "annoy",
    "faiss-cpu",
    "redis",
    "hiredis",
    "pyarrow",
    "threadpoolctl",
)
# Instruction sets a -march=native build may use; a host without one of them cannot run it.
_CPU_FLAGS = ("sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl")
_RELEASED = 1.3  # 2-thread speedup above which the GIL is taken as released


def _versions() -> list[str]:
    out = [f"python {platform.python_version()} ({platform.python_implementation()})"]
    for name in LIBRARIES:
        try:
            out.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name} (not installed)")
    return out


def _faiss() -> Any:
    """faiss loaded as the ann source loads it (its BLAS told the CPU's core type), or None."""
    try:
        return require_faiss()
    except ArtifactError:
        return None


def _threadpools() -> list[str]:
    from threadpoolctl import threadpool_info

    _faiss()  # loaded first, so its own OpenBLAS is listed too
    lines = []
    for p in threadpool_info():
        lines.append(
            f"{p.get('user_api')}: {p.get('internal_api')} {p.get('version') or ''} "
            f"threads={p.get('num_threads')} core={p.get('architecture') or '-'} "
            f"({os.path.basename(str(p.get('filepath')))})"
        )
    env = {
        k: os.environ[k]
        for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE")
        if k in os.environ
    }
    lines.append(f"environment: {env or 'no thread variables set'}")
    return lines


def _blas() -> list[str]:
    try:
        cfg: Any = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        return [f"numpy BLAS: {blas.get('name')} {blas.get('version', '')}".rstrip()]
    except Exception:  # older numpy: threadpoolctl's view above suffices
        return ["numpy BLAS: see the blas thread pools above"]


def _cpu() -> list[str]:
    flags: set[str] = set()
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                elif line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    have = [f for f in _CPU_FLAGS if f in flags]
    missing = [f for f in _CPU_FLAGS if f not in flags]
    lines = [
        f"{model or platform.processor() or 'unknown CPU'}: {os.cpu_count()} CPUs, "
        f"{usable} usable by this process",
        f"flags: {' '.join(have) or 'unknown'}; absent: {' '.join(missing) or 'none'}",
        "annoy was compiled here with -march=native: it may use every flag above, so a host "
        "lacking one crashes (illegal instruction); see README for ANNOY_COMPILER_ARGS",
    ]
    faiss = _faiss()
    if faiss is not None:
        lines.append(f"faiss compile options: {faiss.get_compile_options()}")
    return lines


def gil_speedup(query: Callable[[int], object], n: int) -> float:
    """Wall time of ``n`` queries on one thread over the same on two threads."""

    def run(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            query(i)

    run(0, min(n, 20))  # warm
    t0 = time.perf_counter()
    run(0, n)
    one = time.perf_counter() - t0
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        t0 = time.perf_counter()
        futures = [pool.submit(run, 0, n // 2), pool.submit(run, n // 2, n)]
        for f in futures:
            f.result()
        two = time.perf_counter() - t0
    return one / two if two > 0 else float("nan")


def _gil(items: int, queries: int, dims: int = 32) -> list[str]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(items, dims)).astype(np.float32)
    q: npt.NDArray[np.float32] = rng.normal(size=(queries, dims)).astype(np.float32)
    lines = []
    try:
        from annoy import AnnoyIndex

        index = AnnoyIndex(dims, "euclidean")
        for i, row in enumerate(x.tolist()):
            index.add_item(i, row)
        index.build(8, n_jobs=1)
        rows = q.tolist()
        s = gil_speedup(lambda i: index.get_nns_by_vector(rows[i], 100, search_k=20_000), queries)
        lines.append(_verdict("annoy", s))
    except ImportError:
        lines.append("annoy: not installed")
    faiss = _faiss()
    if faiss is not None:
        ivf = faiss.index_factory(dims, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)  # 1/4 scanned
        ivf.train(x)
        ivf.add(x)
        params = faiss.SearchParametersIVF()
        params.nprobe = 16

        def search(i: int) -> object:
            faiss.omp_set_num_threads(1)
            return ivf.search(q[i : i + 1], 100, params=params)

        lines.append(_verdict("faiss", gil_speedup(search, queries)))
    else:
        lines.append("faiss: not installed")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (cores or 1) < 2:
        lines.append("(one usable core: no speedup is possible, the test says nothing)")
    return lines


def _verdict(name: str, speedup: float) -> str:
    word = "released" if speedup > _RELEASED else "NOT released (or the machine is busy)"
    return f"{name}: {speedup:.2f}x on 2 threads vs 1 -> GIL {word}"


def doctor_sections(items: int = 20_000, queries: int = 400) -> dict[str, tuple[str, list[str]]]:
    """Each section by a stable key (``versions``, ``threadpools``, ``blas``, ``cpu``, ``gil``):
    its title and lines (the GIL test builds a small index of ``items``)."""
    return {
        "versions": ("versions", _versions()),
        "threadpools": ("thread pools (threadpoolctl)", _threadpools()),
        "blas": ("BLAS", _blas()),
        "cpu": ("CPU", _cpu()),
        "gil": (f"GIL during queries ({queries} queries, 1 vs 2 threads)", _gil(items, queries)),
    }


def format_doctor(sections: dict[str, tuple[str, list[str]]]) -> str:
    """The report as text, section by section."""
    out = []
    for title, lines in sections.values():
        out.append(f"== {title}")
        out.extend(f"  {line}" for line in lines)
    return "\n".join(out)


def doctor(items: int = 20_000, queries: int = 400) -> str:
    """The report, section by section (the GIL test builds a small index of ``items``)."""
    return format_doctor(doctor_sections(items, queries))
