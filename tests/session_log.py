"""A small log shaped like a real session log (DIGINETICA's format): one user per session,
short sessions inside topic clusters, re-visits, 1 s between views and 1 h between sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_session_log(
    path: Path,
    *,
    sessions: int,
    seed: int = 0,
    n_items: int = 300,
    clusters: int = 15,
    test_path: Path | None = None,
    test_sessions: int = 0,
) -> None:
    """Write ``sessions`` sessions as CSV. With ``test_path``, the last ``test_sessions`` are
    cut as a next-item test is: all but the last view in ``path``, the last in ``test_path``."""
    rng = np.random.default_rng(seed)
    cluster_of = rng.integers(0, clusters, n_items)
    members = [np.flatnonzero(cluster_of == c) for c in range(clusters)]
    popularity = rng.pareto(1.5, n_items) + 1
    rows: list[tuple[str, int, int]] = []
    test_rows: list[tuple[str, int, int]] = []
    t = 1_600_000_000
    for s in range(sessions):
        pool = members[int(rng.integers(clusters))]
        if pool.size == 0:
            continue
        p = popularity[pool] / popularity[pool].sum()
        length = int(rng.integers(2, 7))
        views: list[int] = []
        for _ in range(length):
            if views and rng.random() < 0.25:  # a re-visit
                views.append(views[int(rng.integers(len(views)))])
            else:
                views.append(int(rng.choice(pool, p=p)))
        user = f"s{s}"
        cut = len(views) - 1 if test_path is not None and s >= sessions - test_sessions else None
        for i, item in enumerate(views):
            (test_rows if cut is not None and i == cut else rows).append((user, item, t + i))
        t += 3600
    _write(path, rows)
    if test_path is not None:
        _write(test_path, test_rows)


def _write(path: Path, rows: list[tuple[str, int, int]]) -> None:
    lines = ["user_id,item_id,timestamp"] + [f"{u},{i},{ts}" for u, i, ts in rows]
    path.write_text("\n".join(lines) + "\n")
