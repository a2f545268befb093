"""Offline evaluation on synthetic data: does the blend beat each source alone?

    python examples/evaluate.py              # 50k items, 1M events: a couple of minutes

Trains on everything before the last 10% of the log, then for each sampled test user checks
which of the items they touched afterwards the sources and the blends put in their candidates.
The same, on your own log: `retrieval eval CONFIG --events LOG --test-fraction 0.1`.
"""

from __future__ import annotations

from pathlib import Path

from retrieval import load_config
from retrieval.evaluation.evaluate import EvalReport, evaluate, format_report, load_for_eval
from retrieval.tools.synth import synthesize

HERE = Path(__file__).resolve().parent


def main(
    n_items: int = 50_000,
    n_users: int = 20_000,
    n_events: int = 1_000_000,
    users: int = 2000,
    ks: tuple[int, ...] = (20, 100, 1000),
    workdir: Path | None = None,
) -> EvalReport:
    data = (workdir or HERE.parent / "data") / "evaluate.parquet"
    synthesize(data, n_items=n_items, n_users=n_users, n_events=n_events, seed=11)
    config = load_config(HERE / "config.yaml")
    split, path = load_for_eval(config, data, None, None, None, 0.1, users)
    report = evaluate(config, split, path, ks)
    print(format_report(report))
    k = ks[-1]
    blend = report.blend[f"recall@{k}"]
    best_name, best = max(
        ((n, s[f"recall@{k}"]) for n, s in report.sources.items()), key=lambda t: t[1]
    )
    print(f"\nrecall@{k}: blend {blend:.4f} vs best single source {best_name} {best:.4f}")
    for name, stats in report.variants.items():
        print(f"           {name} blend {stats[f'recall@{k}']:.4f}")
    verdict = "beats" if blend > best else "does NOT beat"
    print(f"the configured blend {verdict} every source alone at k={k}")
    return report


if __name__ == "__main__":
    main()
