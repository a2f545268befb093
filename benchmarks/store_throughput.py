"""Store throughput: ``record()`` one event per call vs pipelined batches, and the hot-path read.

For the memory store and (when it answers) Redis at ``--url``: events/s recorded one per call and
in batches of ``--batch``; then p50/p99 of the one-round-trip read (a full 200-event history plus
the global and one segment's top 100). Redis keys live under a unique ``bench-<uuid>`` prefix that
is deleted at the end; nothing else on the server is touched.

    PYTHONPATH=. python benchmarks/store_throughput.py [--url redis://127.0.0.1:6379/15]
"""

from __future__ import annotations

import argparse
import os
import random
import time
import uuid
from collections.abc import Callable

import numpy as np
import redis

from retrieval.store import Event, MemoryStore, Store
from retrieval.store.redis_store import RedisStore


def make_events(n: int, seed: int = 0) -> list[Event]:
    rng = random.Random(seed)
    now = time.time()
    countries = ["de", "fr", "us", "br"]
    return [
        Event(
            f"user-{rng.randrange(2_000)}",
            rng.randrange(50_000),
            now - rng.random() * 86_400,
            rng.choice(("click", "click", "click", "cart", "order")),
            {"country": rng.choice(countries)},
        )
        for _ in range(n)
    ]


def throughput(store: Store, events: list[Event], batch: int) -> float:
    t = time.perf_counter()
    if batch == 1:
        for ev in events:
            store.record([ev])
    else:
        for i in range(0, len(events), batch):
            store.record(events[i : i + batch])
    return len(events) / (time.perf_counter() - t)


def latency(fn: Callable[[], object], calls: int) -> str:
    for _ in range(min(100, calls)):
        fn()  # warm up
    times = np.empty(calls)
    for i in range(calls):
        t = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t
    ms = times * 1000
    return f"p50 {np.percentile(ms, 50):.3f} ms  p99 {np.percentile(ms, 99):.3f} ms"


def run(name: str, make: Callable[[], Store], args: argparse.Namespace) -> None:
    events = make_events(args.events)
    single = make()
    n_single = min(len(events), args.single)
    eps1 = throughput(single, events[:n_single], 1)
    single.close()
    store = make()
    epsb = throughput(store, events, args.batch)
    print(f"{name:6s} record: {eps1:12,.0f} events/s one per call   ", end="")
    print(f"{epsb:12,.0f} events/s in batches of {args.batch}")

    user = "hot-user"
    now = time.time()
    store.record([Event(user, i, now - 200 + i, context={"country": "de"}) for i in range(200)])
    if isinstance(store, RedisStore):

        def read() -> object:
            r = store.fetch(user, [None, "country=de"], popular_limit=100, timeout_ms=50)
            assert r.ok and len(r.items) == 200
            return r
    else:

        def read() -> object:
            return (
                store.history(user),
                store.popular(None, 100),
                store.popular("country=de", 100),
            )

    print(f"{name:6s} hot-path read (history 200 + 2 x top 100): {latency(read, args.reads)}")
    store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"))
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--single", type=int, default=5_000, help="events recorded one per call")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--reads", type=int, default=2_000)
    args = ap.parse_args()

    run("memory", MemoryStore, args)

    prefix = f"bench-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(args.url, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        print(f"redis  skipped: nothing answers at the url ({type(exc).__name__})")
        return
    try:
        run("redis", lambda: RedisStore(args.url, prefix=prefix, socket_timeout_ms=1_000), args)
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1_000))
        for i in range(0, len(keys), 1_000):
            client.delete(*keys[i : i + 1_000])
        client.close()


if __name__ == "__main__":
    main()
