"""Rank -> hit-rate curves: how likely a source's candidate at rank r is one the user will touch.

A blend that knows these curves can spend its k slots where they pay off: the 300th candidate of
a strong source may be worth more than the 50th of a weak one, which round-robin and RRF cannot
see. Curves are measured offline (``retrieval calibrate``), smoothed, forced monotone (a lower rank
never predicts a better chance) and stored as JSON beside the artifacts.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from retrieval.artifacts import read_versioned_json
from retrieval.errors import ArtifactError

__all__ = ["CALIBRATION_FILE", "Calibration", "RankCurve", "fit_curve", "isotonic_decreasing"]

CALIBRATION_FILE = "calibration.json"
FORMAT_VERSION = 1
_RERUN = "rerun `retrieval calibrate CONFIG --events LOG`"


def isotonic_decreasing(
    values: npt.NDArray[np.float64], weights: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """Weighted least-squares fit that never increases (scipy's pool adjacent violators)."""
    from scipy.optimize import isotonic_regression  # fitting is offline: serving never loads it

    fit = isotonic_regression(
        np.asarray(values, dtype=np.float64),
        weights=np.maximum(np.asarray(weights, dtype=np.float64), 1e-12),
        increasing=False,
    )
    return np.asarray(fit.x, dtype=np.float64)


@dataclass(frozen=True)
class RankCurve:
    """Hit probability by 0-based rank, piecewise constant over log-spaced rank bins."""

    edges: tuple[int, ...]  # bin starts; the last bin extends to infinity
    p: tuple[float, ...]

    def dense(self, n: int) -> npt.NDArray[np.float64]:
        """The curve evaluated at ranks 0..n-1 (a lookup table for the hot path)."""
        idx = np.searchsorted(np.asarray(self.edges), np.arange(n), side="right") - 1
        return np.asarray(self.p, dtype=np.float64)[np.clip(idx, 0, len(self.p) - 1)]


def fit_curve(
    hits_by_rank: npt.NDArray[np.float64], lists_by_rank: npt.NDArray[np.float64]
) -> RankCurve:
    """Smooth per-rank hit counts into a monotone curve.

    ``hits_by_rank[r]`` counts hits at rank r over all users, ``lists_by_rank[r]`` how many
    users' lists reached rank r. Ranks are pooled into log-spaced bins (rank 0, 1, 2-3, 4-7, ...)
    so the tail is not noise, with a small prior toward the overall rate.
    """
    n = int(lists_by_rank.size)
    if n == 0:
        return RankCurve((0,), (0.0,))
    edges = [0]
    step = 1
    while edges[-1] + step < n:
        edges.append(edges[-1] + step)
        step = step * 2 if len(edges) > 2 else 1
    bounds = [*edges, n]
    h = np.array([hits_by_rank[a:b].sum() for a, b in itertools.pairwise(bounds)])
    m = np.array([lists_by_rank[a:b].sum() for a, b in itertools.pairwise(bounds)])
    overall = h.sum() / max(m.sum(), 1.0)
    prior = 5.0
    rate = (h + prior * overall) / (m + prior)
    mono = isotonic_decreasing(rate, m + prior)
    return RankCurve(tuple(int(e) for e in edges), tuple(float(x) for x in mono))


@dataclass(frozen=True)
class Calibration:
    """One rank curve per source, by source name, and how many users they were measured on
    (few users: noisy curves). What the ``calibrated`` strategy reads, from
    ``calibration.json`` beside the artifacts."""

    curves: Mapping[str, RankCurve]
    users: int

    def save(self, path: Path) -> None:
        """Write the versioned JSON that :meth:`load` reads. Overwrites ``path`` in place, not
        atomically: write it before a retriever that loads it starts."""
        data = {
            "format_version": FORMAT_VERSION,
            "users": self.users,
            "curves": {n: {"edges": list(c.edges), "p": list(c.p)} for n, c in self.curves.items()},
        }
        path.write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: Path, required: Sequence[str]) -> Calibration:
        """The curves in ``path`` (ArtifactError when missing, of another format version, or
        without a curve for one of the ``required`` sources)."""
        data = read_versioned_json(path, FORMAT_VERSION, "calibration", remedy=_RERUN)
        try:
            curves = {
                n: RankCurve(tuple(c["edges"]), tuple(c["p"])) for n, c in data["curves"].items()
            }
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{path}: malformed calibration ({exc!r}); {_RERUN}") from None
        missing = [n for n in required if n not in curves]
        if missing:
            raise ArtifactError(f"{path}: no curve for sources {missing}; {_RERUN} for this config")
        return cls(curves, int(data.get("users", 0)))
