"""What the online store costs a blend: ``blend()`` p50/p99 with the memory store vs Redis on
loopback (history and live popular lists read from the store, one round trip), the neighbour
sources served from pushed rows, and ``record()`` throughput one event per call vs pipelined.

Synthesizes a log (default 50k items / 500k events), builds covisitation, item-CF and popularity
once into ``--work`` (reused on later runs), and records the last 20 events of ``--users`` users
into each store. Redis keys live under a unique ``bench-<uuid>`` prefix deleted at the end.

    PYTHONPATH=. python benchmarks/store_blend.py [--url redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import redis

from retrieval import Retriever
from retrieval.config import RetrievalConfig
from retrieval.offline.build import build
from retrieval.offline.push import push
from retrieval.store import Event
from retrieval.tools.synth import synthesize


def config(artifacts: Path, store: dict[str, Any], backend: str = "local") -> RetrievalConfig:
    neighbours = {"history": 20, "backend": backend}
    return RetrievalConfig.load(
        {
            "k": 1000,
            "deadline_ms": 200,
            "artifacts": str(artifacts),
            "events": {"segments": ["country"]},
            "blend": {"strategy": "rrf", "exclude_seen": True, "fallback": "popular"},
            "store": store,
            "sources": [
                {"name": "covisit", "kind": "covisitation", "params": neighbours},
                {"name": "itemcf", "kind": "itemcf", "params": neighbours},
                {
                    "name": "popular",
                    "kind": "popularity",
                    "weight": 0.3,
                    "params": {"segments": ["country"]},
                },
            ],
        }
    )


def prepare(work: Path, n_items: int, n_events: int) -> tuple[Path, Path]:
    log, artifacts = work / "log.parquet", work / "artifacts"
    if not (artifacts / "manifest.json").exists():
        t = time.perf_counter()
        synthesize(log, n_items=n_items, n_users=n_events // 20, n_events=n_events, seed=7)
        build(config(artifacts, {"kind": "memory"}), log, artifacts, progress=False)
        print(f"synthesized and built in {time.perf_counter() - t:.1f}s into {work}")
    return log, artifacts


def user_events(log: Path, n_users: int) -> tuple[list[Event], list[tuple[Any, str]]]:
    """The last 20 events of the ``n_users`` most active users, stamped recently."""
    t = pq.read_table(log, columns=["user_id", "item_id", "country"])
    user = t.column("user_id").to_numpy()
    item = t.column("item_id").to_numpy()
    country = t.column("country").to_numpy(zero_copy_only=False).astype(str)
    uniq, counts = np.unique(user, return_counts=True)
    top = set(uniq[np.argsort(-counts, kind="stable")[:n_users]].tolist())
    last: dict[Any, list[int]] = {}
    for pos in range(user.size - 1, -1, -1):  # the log is time-ordered: walk back from the end
        u = user[pos].item()
        if u in top and len(last.setdefault(u, [])) < 20:
            last[u].append(pos)
    now = time.time()
    events = [
        Event(u, item[p].item(), now - 60 + j * 1e-3, "click", {"country": str(country[p])})
        for u, positions in last.items()
        for j, p in enumerate(reversed(positions))
    ]
    return events, [(u, str(country[positions[0]])) for u, positions in last.items()]


def blend_latency(
    retrievers: dict[str, Retriever], users: list[tuple[Any, str]], calls: int
) -> dict[str, dict[str, float]]:
    """Interleaved: each user is blended by every retriever in turn, so load from anything
    else on the machine hits all of them alike."""
    rng = random.Random(0)
    for r in retrievers.values():
        for u, c in users[:200]:
            r.blend(user_id=u, context={"country": c})  # warm up
    times = {name: np.empty(calls) for name in retrievers}
    degraded = dict.fromkeys(retrievers, 0)
    for n in range(calls):
        u, c = users[rng.randrange(len(users))]
        for name, r in retrievers.items():
            t = time.perf_counter()
            res = r.blend(user_id=u, context={"country": c})
            times[name][n] = time.perf_counter() - t
            degraded[name] += res.store_status != "ok"
    out = {}
    for name, ts in times.items():
        ms = ts * 1000
        out[name] = {
            "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)),
            "mean": float(ms.mean()),
            "degraded": degraded[name],
        }
    return out


def record_rate(r: Retriever, events: list[Event], batch: int) -> float:
    t = time.perf_counter()
    if batch == 1:
        for ev in events:
            r.store.record([ev])
    else:
        for i in range(0, len(events), batch):
            r.store.record(events[i : i + batch])
    return len(events) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="redis://127.0.0.1:6379/15")
    ap.add_argument("--work", type=Path, default=Path("/tmp/store_blend_bench"))
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--users", type=int, default=2_000)
    ap.add_argument("--calls", type=int, default=3_000)
    args = ap.parse_args()

    log, artifacts = prepare(args.work, args.items, args.events)
    events, users = user_events(log, args.users)
    prefix = f"bench-{uuid.uuid4().hex}"
    stores = {
        "memory": {"kind": "memory"},
        "redis": {"kind": "redis", "url": args.url, "prefix": prefix},
    }
    rates: dict[str, dict[int, float]] = {}
    try:
        retrievers = {name: Retriever(config(artifacts, store)) for name, store in stores.items()}
        push(config(artifacts, stores["redis"]), artifacts, args.url, only=["covisit", "itemcf"])
        remote = Retriever(config(artifacts, stores["redis"], backend="redis"))
        retrievers["redis + pushed rows"] = remote
        retrievers["memory"].record_many(events)
        retrievers["redis"].record_many(events)  # the two redis retrievers share the prefix
        rows = blend_latency(retrievers, users, args.calls)
        for name in stores:
            sample = events[:5_000]
            rates[name] = {b: record_rate(retrievers[name], sample, b) for b in (1, 100, 1000)}
        for r in retrievers.values():
            r.close()
    finally:
        client = redis.Redis.from_url(args.url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=5_000))
        for i in range(0, len(keys), 5_000):
            client.unlink(*keys[i : i + 5_000])
        client.close()

    print(
        f"\nblend() k=1000, {args.items:,} items / {args.events:,} events, "
        f"{len(users):,} users with 20-event histories read from the store, {args.calls:,} calls"
    )
    print(f"  {'store':<22} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'degraded':>9}")
    for name, row in rows.items():
        print(
            f"  {name:<22} {row['p50']:8.3f} {row['p99']:8.3f} {row['mean']:8.3f} "
            f"{int(row['degraded']):>9}"
        )
    extra = rows["redis"]["p99"] - rows["memory"]["p99"]
    print(f"  Redis adds {extra:+.3f} ms to p99 (target: at most +1 ms)")
    print("\nrecord() events/s (5,000 events with a country segment)")
    print(f"  {'store':<22} {'1/call':>10} {'100/call':>10} {'1000/call':>10}")
    for name, r_ in rates.items():
        print(f"  {name:<22} {r_[1]:10,.0f} {r_[100]:10,.0f} {r_[1000]:10,.0f}")


if __name__ == "__main__":
    main()
