"""Hammer: many caller threads, good and hostile sources mixed, for a minute.

Two good sources do real numpy work (a co-visitation-like sum over neighbour rows of a 200k-item
CSR, and a popularity slice). A third, hostile, source spends the first ``--hostile-share`` of
the run cycling through the failures a user's worst day brings: it hangs until the phase ends,
sleeps past the deadline, raises, and returns 2-D arrays, NaN scores, repeated and mixed-kind
ids. Then it behaves. Every blend goes through a real ``Retriever`` (embedded store).

Printed as JSON (and written to ``--json-out PATH``):
- exceptions raised by ``blend`` (must be 0);
- latency p50/p99/max and the share of blends over the deadline (and over deadline + 10 ms);
- per source and phase, the share of each status;
- recovery: how long after the hostile phase ends until the hostile source answers ``ok``
  again, and each source's ok-share over the last 10 s (no lasting outage).

    python benchmarks/hammer.py [--threads 16] [--seconds 60] [--deadline-ms 50]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.config import RetrievalConfig
from retrieval.online.retriever import Retriever
from retrieval.types import Deadline, Request
from sources.base import Need, Ranked, Source, SourceContext, SourceParams
from sources.history import sum_by_id

N_ITEMS = 200_000
ROW = 100


class _Csr:
    """A random neighbour graph: every item has ROW neighbours (built once, shared)."""

    _lock = threading.Lock()
    indices: np.ndarray | None = None
    scores: np.ndarray | None = None

    @classmethod
    def get(cls) -> tuple[np.ndarray, np.ndarray]:
        with cls._lock:
            if cls.indices is None:
                rng = np.random.default_rng(0)
                cls.indices = rng.integers(0, N_ITEMS, (N_ITEMS, ROW), dtype=np.int64)
                cls.scores = np.sort(rng.random((N_ITEMS, ROW), dtype=np.float32), axis=1)[:, ::-1]
            assert cls.scores is not None
            return cls.indices, cls.scores


class Neighbours(Source):
    """Sums the neighbour rows of the history's items (a co-visitation stand-in)."""

    needs = frozenset({Need.HISTORY})

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        indices, scores = _Csr.get()
        hist = np.asarray([h for h in request.history[-20:] if isinstance(h, int)], dtype=np.int64)
        hist = hist[(hist >= 0) & (hist < N_ITEMS)]
        if hist.size == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        uniq, summed = sum_by_id(indices[hist].reshape(-1), scores[hist].reshape(-1))
        total = summed.astype(np.float32)
        top = np.argsort(-total, kind="stable")[:k]
        return uniq[top], total[top]


class Popular(Source):
    """The top of a fixed popularity ranking."""

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        ids = np.arange(k, dtype=np.int64)
        return ids, np.linspace(1.0, 0.0, k, dtype=np.float32)


class HostileParams(SourceParams):
    until: float = 0.0  # monotonic time when the hostile phase ends
    deadline_ms: float = 50.0


class Hostile(Source):
    """Misbehaves in turn until ``until``, then answers like a good source."""

    Params = HostileParams
    MODES = ("hang", "slow", "raise", "2d", "nan", "repeat", "mixed")

    def __init__(self, name: str, params: SourceParams, context: SourceContext) -> None:
        super().__init__(name, params, context)
        assert isinstance(params, HostileParams)
        self.p = params
        self.calls = 0
        self._lock = threading.Lock()

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        with self._lock:
            self.calls += 1
            n = self.calls
        left = self.p.until - time.monotonic()
        if left <= 0:
            ids = np.arange(500, 500 + k, dtype=np.int64)
            return ids, np.linspace(1.0, 0.0, k, dtype=np.float32)
        mode = self.MODES[n % len(self.MODES)]
        if mode == "hang":
            time.sleep(left)  # blocks until the hostile phase is over
        elif mode == "slow":
            time.sleep(3 * self.p.deadline_ms / 1000)
        elif mode == "raise":
            raise RuntimeError("hostile source exploded")
        elif mode == "2d":
            return np.ones((k, 2), np.int64), np.ones((k, 2), np.float32)
        elif mode == "nan":
            return np.arange(k, dtype=np.int64), np.full(k, np.nan, np.float32)
        elif mode == "repeat":
            return np.full(k, 999, np.int64), np.linspace(1, 0, k).astype(np.float32)
        return np.array([1, "a", 2.5, None], dtype=object), np.ones(4, np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--deadline-ms", type=float, default=50.0)
    ap.add_argument("--hostile-share", type=float, default=0.5, help="of the run (default 0.5)")
    ap.add_argument("--json-out", type=Path, help="also write the figures to this JSON file")
    args = ap.parse_args()

    _Csr.get()
    t_start = time.monotonic()
    hostile_until = t_start + args.seconds * args.hostile_share
    here = "benchmarks.hammer" if __name__ != "__main__" else "__main__"
    config = RetrievalConfig.load(
        {
            "k": 1000,
            "deadline_ms": args.deadline_ms,
            "breaker": {"failures": 5, "cooldown_s": 1.0},
            "sources": [
                {"name": "neighbours", "kind": f"{here}:Neighbours"},
                {"name": "popular", "kind": f"{here}:Popular"},
                {
                    "name": "hostile",
                    "kind": f"{here}:Hostile",
                    "params": {"until": hostile_until, "deadline_ms": args.deadline_ms},
                },
            ],
        }
    )
    retriever = Retriever(config)
    rng = np.random.default_rng(1)
    histories = [tuple(int(x) for x in rng.integers(0, N_ITEMS, 20)) for _ in range(1000)]
    stop_at = t_start + args.seconds
    lock = threading.Lock()
    latencies: list[tuple[float, float]] = []  # (time since start, ms)
    statuses: list[tuple[float, str, str]] = []
    errors: Counter[str] = Counter()

    def worker(seed: int) -> None:
        i = seed
        local_lat: list[tuple[float, float]] = []
        local_st: list[tuple[float, str, str]] = []
        while (now := time.monotonic()) < stop_at:
            i += 1
            try:
                res = retriever.blend(user_id=i, history=histories[i % len(histories)])
            except Exception as exc:  # the promise: never
                with lock:
                    errors[f"{type(exc).__name__}: {exc}"] += 1
                continue
            t = now - t_start
            local_lat.append((t, (time.monotonic() - now) * 1000))
            for rep in res.reports:
                local_st.append((t, rep.name, rep.status.value))
        with lock:
            latencies.extend(local_lat)
            statuses.extend(local_st)

    threads = [threading.Thread(target=worker, args=(s * 1_000_000,)) for s in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_close = time.monotonic()
    retriever.close()
    close_s = time.monotonic() - t_close

    lat = np.array([ms for _, ms in latencies])
    phase_end = hostile_until - t_start
    out: dict[str, Any] = {
        "threads": args.threads,
        "seconds": args.seconds,
        "deadline_ms": args.deadline_ms,
        "cpus": os.cpu_count(),
        "blends": int(lat.size),
        "blends_per_s": round(lat.size / args.seconds, 1),
        "exceptions": sum(errors.values()),
        "exception_kinds": dict(errors.most_common(5)),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "max_ms": round(float(lat.max()), 2),
        "over_deadline": round(float(np.mean(lat > args.deadline_ms)), 4),
        "over_deadline_plus_10ms": round(float(np.mean(lat > args.deadline_ms + 10)), 4),
        "close_s": round(close_s, 2),
    }
    by_phase: dict[str, dict[str, dict[str, float]]] = {}
    last10 = args.seconds - 10
    for phase, keep in (
        ("hostile", lambda t: t < phase_end),
        ("after", lambda t: t >= phase_end),
        ("last_10s", lambda t: t >= last10),
    ):
        counts: dict[str, Counter[str]] = {}
        for t, name, st in statuses:
            if keep(t):
                counts.setdefault(name, Counter())[st] += 1
        by_phase[phase] = {
            name: {k: round(v / sum(c.values()), 4) for k, v in sorted(c.items())}
            for name, c in counts.items()
        }
    out["status_share"] = by_phase
    first_ok = [
        t for t, name, st in statuses if name == "hostile" and st == "ok" and t >= phase_end
    ]
    out["hostile_ok_again_after_s"] = round(min(first_ok) - phase_end, 2) if first_ok else None
    print(json.dumps(out, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
