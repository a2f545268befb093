"""Quickstart: synthesize a small event log, build every source, blend candidates for a user.

    python examples/quickstart.py            # ~20k items, 200k events: well under a minute

Runs on the embedded in-memory store; no Redis needed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from retrieval import CandidateSet, Retriever, load_config
from retrieval.offline.build import build, format_summary
from retrieval.offline.events import read_events
from retrieval.tools.synth import synthesize

HERE = Path(__file__).resolve().parent


def main(
    n_items: int = 20_000,
    n_users: int = 5_000,
    n_events: int = 200_000,
    workdir: Path | None = None,
) -> CandidateSet:
    """Run it all; ``workdir`` (tests pass one) holds the log and the build, not the repo."""
    config = load_config(HERE / "config.yaml")
    if workdir is not None:
        config = config.model_copy(update={"artifacts": workdir / "artifacts"})
    assert config.artifacts is not None
    artifacts = config.resolve_path(config.artifacts)
    data = (workdir or HERE.parent / "data") / "quickstart.parquet"

    t0 = time.perf_counter()
    stats = synthesize(data, n_items=n_items, n_users=n_users, n_events=n_events, seed=7)
    print(
        f"1. synthesized {stats.n_events:,} events over {stats.n_items:,} items "
        f"in {time.perf_counter() - t0:.1f}s -> {data}"
    )

    events = read_events(data, config.events.columns, config.events.segments)
    rows = build(config, data, artifacts, events=events)
    print(f"2. built {len(rows)} sources into {artifacts}")
    print("   " + format_summary(rows, len(events), len(events.item_ids)).replace("\n", "\n   "))

    # A user from the log, with their last events as live history in the embedded store.
    user = events.user_ids.to_external([events.users[len(events) // 2]])[0].item()
    mine = events.users == events.users[len(events) // 2]
    recent_items = events.item_ids.to_external(events.items[mine][-10:])
    recent_times = events.timestamps[mine][-10:]

    with Retriever(config) as retriever:
        for item, ts in zip(recent_items.tolist(), recent_times.tolist(), strict=True):
            retriever.record(user, item, timestamp=ts, event_type="click")
        retriever.blend(user_id=user, context={"country": "DE"})  # warm-up: first touch of mmaps
        result = retriever.blend(user_id=user, context={"country": "DE"})

    print(f"3. blended {len(result)} candidates for user {user} in {result.elapsed_ms:.2f} ms")
    print(f"   {'item':>10}  {'score':>8}  provenance (source#rank)")
    for c in list(result)[:10]:
        prov = ", ".join(f"{name}#{rank}" for name, rank in c.ranks.items())
        print(f"   {c.item_id!s:>10}  {c.score:8.5f}  {prov}")
    print("   per-source report:")
    for r in result.reports:
        why = f"  ({r.error})" if r.error else ""
        print(
            f"     {r.name:<8} {r.status.value:<12} {r.latency_ms:7.2f} ms  "
            f"returned {r.returned:>5}  kept {r.survived:>5}{why}"
        )
    if len(result) == 0:
        sys.exit("no candidates: something is wrong")
    return result


if __name__ == "__main__":
    main()
