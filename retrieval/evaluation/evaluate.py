"""Offline recall: does the blend put the items a user will engage with into its k candidates?

A temporal split: sources are built on the events before a cutoff; for each test user the
distinct items they touch after it are the targets, and the user's pre-cutoff events are the
history the request carries. Metrics are reported per source (each source alone, with the same
exclusions the blend applies) and for the blend.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from blender.calibration import CALIBRATION_FILE, Calibration, fit_curve
from blender.fanout import NO_CLOCK_MS, Blender
from blender.filters import Exclusions
from blender.merge import SourceList, merge, unify_id_dtypes
from retrieval.artifacts import IdMap
from retrieval.config import RetrievalConfig
from retrieval.errors import InputError
from retrieval.ids import id_keys
from retrieval.offline.build import build
from retrieval.offline.events import EventLog, read_events
from retrieval.online.retriever import Retriever, make_blender
from retrieval.types import Deadline, Request, SourceStatus, as_id_array
from sources.base import SkipSource

__all__ = [
    "EvalError",
    "EvalReport",
    "Split",
    "compact",
    "cutoff_for_fraction",
    "evaluate",
    "format_report",
    "parse_cutoff",
    "score_user",
    "split_by_time",
]


logger = logging.getLogger(__name__)


class EvalError(InputError):
    """An evaluation that cannot be run as asked (no test users, a bad split)."""


@dataclass(frozen=True)
class Split:
    """What an evaluation builds on and what it scores against: built from ``train`` only, so
    no source has seen a target. ``targets[i]`` are the distinct items ``users[i]`` touched in
    the test part (external ids); ``cutoff`` is the split time in Unix seconds, None for a split
    given as two files."""

    train: EventLog
    users: npt.NDArray[Any]  # external ids of test users
    targets: list[npt.NDArray[Any]]  # external item ids each test user touched after the cutoff
    cutoff: float | None


@dataclass
class EvalReport:
    """Every figure of one evaluation, by metric name (``recall@k``, ``p99_ms``...): each source
    alone, the blend, its variants (other strategies on the same answers), recall curves and
    overlap. What ``format_report``, the HTML report and ``--json`` render."""

    ks: list[int]
    users: int
    sources: dict[str, dict[str, float]] = field(default_factory=dict)
    blend: dict[str, float] = field(default_factory=dict)
    variants: dict[str, dict[str, float]] = field(default_factory=dict)
    quota_sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)
    calibration: Calibration | None = None
    seconds: float = 0.0
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # recall by k
    overlap: dict[str, dict[str, int]] = field(default_factory=dict)  # hits, unique hits at k

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (what ``--json`` prints). Leaves out ``calibration`` (an object
        with its own ``save``) and ``seconds`` (the CLI logs it to stderr)."""
        return {
            "k": self.ks,
            "users": self.users,
            "sources": self.sources,
            "blend": self.blend,
            "variants": self.variants,
            "quota_sensitivity": self.quota_sensitivity,
            "curves": self.curves,
            "overlap": self.overlap,
        }


def report_data(report: EvalReport, title: str, subtitle: str) -> dict[str, Any]:
    """What ``retrieval.evaluation.report`` draws for an evaluation."""
    rows = {**report.sources, "blend": report.blend}
    rows.update({f"blend:{n}": v for n, v in report.variants.items()})
    latency = {
        n: {
            "p50_ms": v["p50_ms"],
            "p99_ms": v["p99_ms"],
            "timeouts": int(v.get("over_timeout", 0)),
        }
        for n, v in rows.items()
        if "p50_ms" in v
    }
    return {
        "title": title,
        "subtitle": subtitle,
        "curves": report.curves,
        "table": {"ks": report.ks, "rows": rows},
        "overlap": report.overlap,
        "latency": latency,
        "notes": [
            f"{report.users} test users; recall merges the answers each source gave with no "
            "clock running, so it does not depend on machine load.",
            "timeouts: calls slower than the source's timeout_ms (they would have been dropped "
            "by a live blend).",
        ],
    }


def parse_cutoff(text: str) -> float:
    """Unix seconds or an ISO-8601 date/time (UTC when no offset is given)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise EvalError(
            f"--split-time {text!r}: expected unix seconds or ISO-8601 (2024-03-01T00:00:00)"
        ) from None
    if dt.tzinfo is None:
        from datetime import UTC

        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def cutoff_for_fraction(events: EventLog, fraction: float) -> float:
    """The time (Unix seconds) after which the last ``fraction`` of the events fall, counted in
    events rather than in time, so a quiet tail still leaves test users. EvalError unless
    ``0 < fraction < 1``."""
    if not 0 < fraction < 1:
        raise EvalError(f"--test-fraction must be between 0 and 1 (exclusive), got {fraction}")
    return float(np.quantile(events.timestamps, 1.0 - fraction))


def compact(events: EventLog) -> EventLog:
    """The same events with id maps holding only the users and items that occur in them.

    Training on a time split must not know that test-only items exist at all.
    """
    item_codes, items = np.unique(events.items, return_inverse=True)
    user_codes, users = np.unique(events.users, return_inverse=True)
    return dataclasses.replace(
        events,
        users=users.astype(np.int32).ravel(),
        items=items.astype(np.int32).ravel(),
        user_ids=IdMap(np.asarray(events.user_ids.to_external(user_codes))),
        item_ids=IdMap(np.asarray(events.item_ids.to_external(item_codes))),
    )


def split_by_time(events: EventLog, cutoff: float, max_users: int | None, seed: int = 0) -> Split:
    """Train on the events before ``cutoff``, test on those at or after it: serving only ever
    knows the past. Train's id maps hold only what occurs before the cutoff. At most
    ``max_users`` test users, a sample fixed by ``seed``. EvalError when the cutoff is outside
    the log or leaves no test events."""
    ts = events.timestamps
    lo, hi = float(ts.min()), float(ts.max())
    if not lo < cutoff <= hi:
        raise EvalError(
            f"cutoff {cutoff:.0f} is outside the log: events span {lo:.0f} .. {hi:.0f} "
            f"({_iso(lo)} .. {_iso(hi)}); pick a time inside it"
        )
    before = ts < cutoff
    train = compact(events.subset(before))
    test = ~before
    return _split(train, events.users[test], events.items[test], events, max_users, seed, cutoff)


def holdout_split(events: EventLog, fraction: float, max_users: int | None, seed: int = 0) -> Split:
    """A validation split shaped like a next-items test, from one log.

    Every user active in the last ``fraction`` of the log's time holds out their later events:
    the events before the cutoff are their history. A user with none before it (a session that
    began after the cutoff, the usual case in session logs, where a plain time split leaves the
    validation users without history) keeps a seeded random prefix of their own later events as
    history, at least one event; users with a single later event and no history are dropped.
    The fit part is everything that is not held out, as in a test whose users' earlier events
    are in the training log. ``max_users`` of the validation users are scored.
    """
    cutoff = cutoff_for_fraction(events, fraction)
    ts, users = events.timestamps, events.users
    n = len(events)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if n else np.empty(0, np.intp)
    ends = np.r_[starts[1:], n].astype(np.intp)
    # Events are sorted by (user, time): the first event at or after the cutoff, per user.
    late_at = np.where(ts >= cutoff, np.arange(n), n)
    first_late = np.minimum(np.minimum.reduceat(late_at, starts), ends) if n else ends
    rng = np.random.default_rng(seed)
    late = first_late < ends
    no_history = late & (first_late == starts)
    cut = first_late.copy()
    spans = ends[no_history] - starts[no_history]
    cut[no_history] = starts[no_history] + rng.integers(1, np.maximum(spans, 2))
    valid = late & (cut < ends)
    marks = np.zeros(n + 1, dtype=np.int64)
    np.add.at(marks, cut[valid], 1)
    np.add.at(marks, ends[valid], -1)
    held = np.cumsum(marks[:n]) > 0
    if not held.any():
        raise EvalError(
            f"no validation users: nobody is active in the last {fraction:.0%} of the log "
            "with anything left to predict"
        )
    train = compact(events.subset(~held))
    return _split(train, users[held], events.items[held], events, max_users, seed, cutoff)


def split_from_files(
    train: EventLog, test: EventLog, max_users: int | None, seed: int = 0
) -> Split:
    """A split the caller made: build on ``train``, score every user of ``test`` on the items
    they touched there (at most ``max_users``, sampled by ``seed``). Nothing checks the two logs
    for overlap in time; ``cutoff`` is None. EvalError when ``test`` is empty."""
    return _split(train, test.users, test.items, test, max_users, seed, None)


def _split(
    train: EventLog,
    test_users: npt.NDArray[np.int32],
    test_items: npt.NDArray[np.int32],
    test_log: EventLog,
    max_users: int | None,
    seed: int,
    cutoff: float | None,
) -> Split:
    if test_users.size == 0:
        raise EvalError("no test events after the cutoff: no test users to evaluate")
    uniq_users = np.unique(test_users)
    if max_users is not None and uniq_users.size > max_users:
        rng = np.random.default_rng(seed)
        uniq_users = np.sort(rng.choice(uniq_users, max_users, replace=False))
    keep = np.isin(test_users, uniq_users)
    pairs = np.unique(
        np.stack([test_users[keep].astype(np.int64), test_items[keep].astype(np.int64)]), axis=1
    )
    bounds = np.searchsorted(pairs[0], uniq_users)
    bounds = np.append(bounds, pairs.shape[1])
    targets = [
        np.asarray(test_log.item_ids.to_external(pairs[1, bounds[i] : bounds[i + 1]]))
        for i in range(uniq_users.size)
    ]
    users = np.asarray(test_log.user_ids.to_external(uniq_users))
    return Split(train=train, users=users, targets=targets, cutoff=cutoff)


def score_user(
    candidates: npt.NDArray[Any], targets: npt.NDArray[Any], seen: npt.NDArray[Any], k: int
) -> tuple[float, float | None, bool, npt.NDArray[Any]]:
    """(recall, recall over new targets or None when there are none, any hit, the hits)."""
    top = candidates[:k]
    hits = targets[np.isin(targets, top)]
    recall = hits.size / targets.size if targets.size else 0.0
    new = targets[~np.isin(targets, seen)]
    recall_new = None if new.size == 0 else np.isin(new, top).sum() / new.size
    return recall, recall_new, bool(hits.size), hits


def evaluate(
    config: RetrievalConfig,
    split: Split,
    events_path: Path,
    ks: Sequence[int],
    *,
    workers: int = 2,
    progress: bool | None = None,
    calibrate_blend: bool = True,
) -> EvalReport:
    """Build on the train part into a temporary directory, then score sources and blends.

    Every source is asked once per user with no clock running; the configured blend, the
    round-robin blend and (when ``calibrate_blend``) the calibrated blend are then merged from
    those same answers by the serving blender's own steps (``Blender.combine``), so recall does
    not depend on machine load. The live ``blend()`` still runs with its deadlines, for latency
    and for the timeouts it would have had, reported apart. Calibration curves come from a
    hold-out inside the train part (never from the test events).
    """
    ks = sorted(set(ks))
    n_items = len(split.train.item_ids)
    if ks[-1] > n_items:
        raise EvalError(f"k {ks[-1]} is above the training catalog size ({n_items} items)")
    show = sys.stderr.isatty() if progress is None else progress
    t0 = time.perf_counter()
    calibration = None
    if calibrate_blend or config.blend.strategy == "calibrated":
        try:
            calibration = calibrate(config, split.train, events_path, k=ks[-1], progress=show)
        except EvalError as exc:  # e.g. a train part too small to hold a slice out
            if config.blend.strategy == "calibrated":
                raise
            logger.warning("no calibrated blend: %s", exc)
    report = EvalReport(ks=ks, users=len(split.users))
    with tempfile.TemporaryDirectory(prefix="retrieval-eval-") as tmp:
        artifacts = Path(tmp) / "artifacts"
        build(config, events_path, artifacts, events=split.train, progress=show)
        if calibration is not None:
            calibration.save(artifacts / CALIBRATION_FILE)
        cfg = for_artifacts(config, artifacts, ks[-1])
        runs = collect(cfg, split, ks[-1], workers, show)
        curves = None
        if calibration is not None:
            depth = ks[-1] + cfg.store.history_len + 1
            curves = {n: c.dense(depth) for n, c in calibration.curves.items()}
        with Retriever(cfg) as retriever:
            blends = {_BLEND: combine_all(retriever.blender, runs.requests, runs.answers)}
            variants = {"round_robin": _round_robin(cfg)}
            if calibration is not None and config.blend.strategy != "calibrated":
                variants["calibrated"] = cfg.model_copy(
                    update={"blend": cfg.blend.model_copy(update={"strategy": "calibrated"})}
                )
            for label, variant in variants.items():
                blender = make_blender(variant, retriever.sources, curves)
                try:
                    blends[label] = combine_all(blender, runs.requests, runs.answers)
                finally:
                    blender.close()
    seen = seen_items(split)
    names = list(runs.answers)
    lists = {n: source_lists(runs, n, config.blend.exclude_seen, ks[-1]) for n in names}
    for name in names:
        stats = metrics(lists[name], split, seen, ks)
        for k in ks:
            stats[f"unique_hits@{k}"] = float(_unique_hits(lists, name, split, k))
        stats.update(_latency(runs.latency_ms[name]))
        stats["over_timeout"] = float(runs.over_timeout[name])
        stats["live_timeouts"] = float(runs.live_timeouts[name])
        report.sources[name] = stats
    report.blend = metrics(blends[_BLEND], split, seen, ks)
    report.blend.update(_latency(runs.blend_latency_ms))
    report.blend["coverage"] = _coverage(blends[_BLEND], n_items)
    with_blend = {**lists, _BLEND: blends[_BLEND]}
    for k in ks:
        # Hits of the blend that no source had in its own top k (backfill, deeper ranks).
        report.blend[f"unique_hits@{k}"] = float(_unique_hits(with_blend, _BLEND, split, k))
    for label in variants:
        report.variants[label] = metrics(blends[label], split, seen, ks)
    report.calibration = calibration
    grid = log_grid(ks[-1])
    report.curves = {n: recall_curve(v, split, grid) for n, v in lists.items()}
    report.curves["blend"] = recall_curve(blends[_BLEND], split, grid)
    for label in variants:
        report.curves[f"blend:{label}"] = recall_curve(blends[label], split, grid)
    report.overlap = hits_and_unique(lists, split, ks[-1])
    report.quota_sensitivity = _quota_sensitivity(lists, names, split, seen, ks[-1])
    report.seconds = time.perf_counter() - t0
    return report


def for_artifacts(config: RetrievalConfig, artifacts: Path, k: int) -> RetrievalConfig:
    """``config`` serving a build made elsewhere, at depth ``k``; calibrated curves are read from
    that build (where evaluation saved the ones it fitted), not from a file the config names."""
    return config.model_copy(
        update={
            "artifacts": artifacts,
            "k": k,
            "blend": config.blend.model_copy(update={"calibration": None}),
        }
    )


def _round_robin(config: RetrievalConfig) -> RetrievalConfig:
    """Equal quotas, sources interleaved by rank: the baseline any blend should beat."""
    sources = [sc.model_copy(update={"quota": None}) for sc in config.sources]
    blend = config.blend.model_copy(update={"strategy": "quota"})
    return config.model_copy(update={"blend": blend, "sources": sources})


Answer = tuple[npt.NDArray[Any], npt.NDArray[np.float32]] | None


@dataclass
class Runs:
    """Every source's raw answer for every test user, and how long each call took.

    Answers are unfiltered and as deep as a blend that excludes the user's history would ask
    (``k`` + history + request excludes), so any blend setting can be re-merged from them.
    """

    requests: list[Request]
    answers: dict[str, list[Answer]]
    latency_ms: dict[str, npt.NDArray[np.float64]]
    over_timeout: dict[str, int]  # calls slower than the source's timeout_ms
    live_timeouts: dict[str, int]  # timeouts (and open breakers) inside the live blend()
    blend_latency_ms: npt.NDArray[np.float64]


def source_lists(runs: Runs, name: str, exclude_seen: bool, k: int) -> list[npt.NDArray[Any]]:
    """One source's ids per user after the blend's exclusions, cut to ``k``."""
    out = []
    for req, ans in zip(runs.requests, runs.answers[name], strict=True):
        if ans is None:
            out.append(np.empty(0, dtype=np.int64))
            continue
        ids = ans[0]
        excl = Exclusions(req.exclude, req.history if exclude_seen else ())
        out.append(ids[excl.mask(ids)][:k])
    return out


def combine_all(
    blender: Blender, requests: Sequence[Request], answers: Mapping[str, Sequence[Answer]]
) -> list[npt.NDArray[Any]]:
    """The blend's ids per user, merged by ``blender`` from the answers in hand."""
    names = [slot.name for slot in blender.slots]
    out = []
    for i, req in enumerate(requests):
        ids, _, _, _ = blender.combine(req, [answers[n][i] for n in names])
        out.append(ids)
    return out


def calibrate(
    config: RetrievalConfig,
    train: EventLog,
    events_path: Path,
    *,
    k: int,
    holdout_fraction: float = 0.1,
    max_users: int = 2000,
    progress: bool = False,
    workers: int = 2,
    seed: int = 1,
) -> Calibration:
    """Rank -> hit-rate curves measured on a hold-out of ``train`` (``holdout_split``)."""
    inner = holdout_split(train, holdout_fraction, max_users, seed=seed)
    k = min(k, len(inner.train.item_ids))
    with tempfile.TemporaryDirectory(prefix="retrieval-tune-") as tmp:
        artifacts = Path(tmp) / "artifacts"
        build(config, events_path, artifacts, events=inner.train, progress=progress)
        cfg = for_artifacts(config, artifacts, k)
        cfg = cfg.model_copy(update={"blend": cfg.blend.model_copy(update={"strategy": "rrf"})})
        runs = collect(cfg, inner, k, workers, progress, live_blend=False)
    return fit_calibration(runs, inner, config.blend.exclude_seen, k)


def fit_calibration(runs: Runs, split: Split, exclude_seen: bool, k: int) -> Calibration:
    """Each source's chance of a hit by rank, over the lists the blend would merge."""
    curves = {}
    for name in runs.answers:
        hits = np.zeros(k, dtype=np.float64)
        reach = np.zeros(k, dtype=np.float64)
        lists = source_lists(runs, name, exclude_seen, k)
        for cands, targets in zip(lists, split.targets, strict=True):
            cands = _same_dtype(cands, targets)[:k]
            reach[: cands.size] += 1
            hits[: cands.size] += np.isin(cands, targets)
        curves[name] = fit_curve(hits, reach)
    return Calibration(curves, users=len(split.users))


def collect(
    config: RetrievalConfig,
    split: Split,
    k_max: int,
    workers: int,
    show: bool,
    *,
    live_blend: bool = True,
) -> Runs:
    """Every source's answer for every test user (and the live blend's timing).

    ``config`` must serve a finished build (``for_artifacts``). With ``workers > 1``, users are
    scored in that many processes, each with its own retriever over the same memory-mapped
    artifacts: threads alone would keep most of the Python work on one core.
    """
    requests = _requests(split, config.store.history_len, k_max)
    n = len(requests)
    batches = [requests[i : i + 128] for i in range(0, n, 128)]
    outs: list[_Scored] = []
    parallel = workers > 1 and n >= 2 * 128
    with tqdm(total=n, desc="eval users", unit="user", disable=not show) as bar:
        if parallel:
            ctx = multiprocessing.get_context("spawn")
            dump = config.model_dump(mode="json")
            init = (dump, config.origin, str(config.base_dir), k_max, live_blend)
            with ProcessPoolExecutor(workers, ctx, _init_worker, init) as pool:
                for done in pool.map(_score_batch, batches):
                    outs.extend(done)
                    bar.update(len(done))
        else:
            with Retriever(config) as retriever:
                scorer = _Scorer(retriever, k_max, live_blend)
                for batch in batches:
                    outs.extend(scorer.one(r) for r in batch)
                    bar.update(len(batch))
    names = [sc.name for sc in config.sources]
    limits = {sc.name: sc.timeout_ms or config.deadline_ms for sc in config.sources}
    latency = {name: np.array([o.latency_ms[name] for o in outs]) for name in names}
    return Runs(
        requests=requests,
        answers={name: [o.answers[name] for o in outs] for name in names},
        latency_ms=latency,
        over_timeout={name: int((latency[name] > limits[name]).sum()) for name in names},
        live_timeouts={name: sum(o.live_timeouts.get(name, 0) for o in outs) for name in names},
        blend_latency_ms=np.array([o.blend_ms for o in outs if o.blend_ms is not None]),
    )


def _requests(split: Split, history_len: int, k_max: int) -> list[Request]:
    """Each test user's request: their last pre-cutoff events as history."""
    train = split.train
    hist = _histories(train)
    type_names = np.asarray(train.event_type_names or ("",), dtype=object)
    max_hist = max(history_len, 1)
    out = []
    # By the id rule, not by Python equality: a test log may spell a train user "42" or 42.
    dense = train.user_ids.to_dense(split.users).tolist()
    for user, d in zip(split.users.tolist(), dense, strict=True):
        h = hist.get(d)
        if h is None:
            out.append(Request(user_id=user, k=k_max))
            continue
        items, stamps, (s, e) = h
        types = None
        if train.event_types is not None:
            types = tuple(type_names[train.event_types[s:e][-max_hist:]].tolist())
        out.append(
            Request(
                user_id=user,
                history=tuple(items[-max_hist:].tolist()),
                history_timestamps=tuple(stamps[-max_hist:].tolist()),
                history_event_types=types,
                k=k_max,
            )
        )
    return out


@dataclass
class _Scored:
    answers: dict[str, Answer]
    latency_ms: dict[str, float]
    live_timeouts: dict[str, int]
    blend_ms: float | None


class _Scorer:
    """Asks each source alone (deep enough for any exclusion), then times the live blend."""

    def __init__(self, retriever: Retriever, k_max: int, live_blend: bool) -> None:
        self.retriever = retriever
        self.k_max = k_max
        self.live_blend = live_blend

    def one(self, req: Request) -> _Scored:
        ask = self.k_max + len(Exclusions(req.exclude, req.history))
        answers: dict[str, Answer] = {}
        lat: dict[str, float] = {}
        for src in self.retriever.sources:
            t = time.perf_counter()
            try:
                if src.missing(req) is not None:
                    raise SkipSource("needs unmet")
                ids, scores = src.retrieve(req, ask, Deadline.in_ms(NO_CLOCK_MS))
                answers[src.name] = (
                    as_id_array(ids)[:ask],
                    np.asarray(scores, dtype=np.float32)[:ask],
                )
            except SkipSource:
                answers[src.name] = None
            lat[src.name] = (time.perf_counter() - t) * 1000
        if not self.live_blend:
            return _Scored(answers, lat, {}, None)
        t = time.perf_counter()
        result = self.retriever.blend(req)
        blend_ms = (time.perf_counter() - t) * 1000
        late = {
            r.name: 1
            for r in result.reports
            if r.status in (SourceStatus.TIMEOUT, SourceStatus.CIRCUIT_OPEN)
        }
        return _Scored(answers, lat, late, blend_ms)


_worker: _Scorer | None = None


def _init_worker(
    dump: dict[str, Any], origin: str, base_dir: str, k_max: int, live_blend: bool
) -> None:
    global _worker
    cfg = RetrievalConfig.load(dump, origin, base_dir=Path(base_dir), environ={})
    _worker = _Scorer(Retriever(cfg), k_max, live_blend)


def _score_batch(batch: list[Request]) -> list[_Scored]:
    assert _worker is not None, "worker not initialised"
    return [_worker.one(r) for r in batch]


_BLEND = "__blend__"


def _histories(train: EventLog) -> dict[int, tuple[npt.NDArray[Any], npt.NDArray[Any], Any]]:
    """Each training user's events by dense user index: external item ids, timestamps, and
    their span in ``train``."""
    starts = np.flatnonzero(np.r_[True, train.users[1:] != train.users[:-1]])
    ends = np.r_[starts[1:], train.users.size]
    users = train.users[starts].tolist()
    items = train.item_ids.to_external(train.items)
    return {
        u: (items[s:e], train.timestamps[s:e], (s, e))
        for u, s, e in zip(users, starts, ends, strict=True)
    }


def metrics(
    lists: Sequence[npt.NDArray[Any]],
    split: Split,
    seen: Sequence[npt.NDArray[Any]],
    ks: Sequence[int],
) -> dict[str, float]:
    """Recall, recall of new items and hit rate at each k, averaged over users."""
    stats: dict[str, float] = {}
    for k in ks:
        rec, rec_new, hit, cnt = [], [], [], []
        for cands, targets, seen_i in zip(lists, split.targets, seen, strict=True):
            cands = _same_dtype(cands, targets)
            r, rn, h, _ = score_user(cands, targets, _same_dtype(seen_i, targets), k)
            rec.append(r)
            hit.append(h)
            cnt.append(min(cands.size, k))
            if rn is not None:
                rec_new.append(rn)
        stats[f"recall@{k}"] = float(np.mean(rec))
        stats[f"recall_new@{k}"] = float(np.mean(rec_new)) if rec_new else 0.0
        stats[f"hitrate@{k}"] = float(np.mean(hit))
        stats[f"candidates@{k}"] = float(np.mean(cnt))
    return stats


def seen_items(split: Split) -> list[npt.NDArray[Any]]:
    """Each test user's training items (external ids, aligned with ``split.users``; empty for
    a user the train part does not know): what ``recall_new`` leaves out of the targets."""
    train = split.train
    dense = train.user_ids.to_dense(split.users)
    starts = np.searchsorted(train.users, dense, side="left")
    ends = np.searchsorted(train.users, dense, side="right")
    out = []
    for d, s, e, t in zip(dense.tolist(), starts, ends, split.targets, strict=True):
        if d < 0:
            out.append(np.empty(0, dtype=t.dtype))
        else:
            out.append(np.asarray(train.item_ids.to_external(train.items[s:e])))
    return out


def log_grid(k: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to and including ``k``: where recall curves are drawn."""
    out = [m * 10**e for e in range(len(str(max(k, 1)))) for m in (1, 2, 5)]
    return sorted({x for x in out if x < k} | {k})


def recall_curve(
    lists: Sequence[npt.NDArray[Any]], split: Split, ks: Sequence[int]
) -> dict[str, list[float]]:
    """Recall at every k of ``ks`` in one pass per user (for the report's curves)."""
    grid = np.asarray(ks)
    total = np.zeros(grid.size, dtype=np.float64)
    for cands, targets in zip(lists, split.targets, strict=True):
        if targets.size == 0:
            continue
        cands = _same_dtype(cands, targets)[: int(grid[-1])]
        positions = np.flatnonzero(np.isin(cands, targets))
        total += np.searchsorted(positions, grid, side="left") / targets.size
    n = max(len(split.targets), 1)
    return {"k": [int(x) for x in grid], "recall": (total / n).tolist()}


def hits_and_unique(
    lists: Mapping[str, Sequence[npt.NDArray[Any]]], split: Split, k: int
) -> dict[str, dict[str, int]]:
    """Per list: hits at k, and hits at k that no other list has (what it alone contributes)."""
    out = {}
    for name, per_user in lists.items():
        hits = 0
        for cands, targets in zip(per_user, split.targets, strict=True):
            hits += int(np.isin(targets, _same_dtype(cands, targets)[:k]).sum())
        out[name] = {"hits": hits, "unique_hits": _unique_hits(lists, name, split, k)}
    return out


def _latency(ms: npt.NDArray[np.float64]) -> dict[str, float]:
    if ms.size == 0:
        return {"p50_ms": 0.0, "p99_ms": 0.0}
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _coverage(lists: Sequence[npt.NDArray[Any]], n_items: int) -> float:
    nonempty = [x for x in lists if x.size]
    if not nonempty:
        return 0.0
    return float(np.unique(np.concatenate(unify_id_dtypes(nonempty))).size / n_items)


def _quota_merge(
    lists: Mapping[str, Sequence[npt.NDArray[Any]]], i: int, k: int, quotas: Mapping[str, int]
) -> npt.NDArray[Any]:
    """User ``i``'s filtered source lists merged with the given quotas."""
    parts = [
        SourceList(
            ids=lists[name][i],
            scores=np.zeros(lists[name][i].size, dtype=np.float32),
            ranks=np.arange(lists[name][i].size, dtype=np.int32),
            quota=quota,
        )
        for name, quota in quotas.items()
    ]
    return merge(parts, k, "quota", 60.0).item_ids


def _quota_sensitivity(
    lists: Mapping[str, Sequence[npt.NDArray[Any]]],
    names: Sequence[str],
    split: Split,
    seen: Sequence[npt.NDArray[Any]],
    k: int,
) -> dict[str, dict[str, float]]:
    """Recall@k of an equal-quota blend, and with each source's quota moved by +/- 10% of k.

    The slots a source gains are taken evenly from the others (and given back when it loses).
    """
    n = len(split.users)
    base = {name: k // len(names) for name in names}
    base[names[0]] += k - sum(base.values())

    def recall(quotas: Mapping[str, int]) -> float:
        merged = [_quota_merge(lists, i, k, quotas) for i in range(n)]
        return metrics(merged, split, seen, [k])[f"recall@{k}"]

    out: dict[str, dict[str, float]] = {"_base": {"recall": recall(base)}}
    step = max(1, k // 10)
    for name in names:
        row: dict[str, float] = {}
        for sign, label in ((1, "+10%"), (-1, "-10%")):
            q = dict(base)
            delta = sign * min(step, q[name] if sign < 0 else k - q[name])
            q[name] += delta
            others = [o for o in names if o != name]
            for j, o in enumerate(others):
                share = delta // len(others) + (1 if j < delta % len(others) else 0)
                q[o] = max(q[o] - share, 0)
            row[label] = recall(q)
        out[name] = row
    return out


def _unique_hits(
    lists: Mapping[str, Sequence[npt.NDArray[Any]]], name: str, split: Split, k: int
) -> int:
    """Hits at k that no other source found at k."""
    total = 0
    for i, targets in enumerate(split.targets):
        mine = targets[np.isin(targets, _same_dtype(lists[name][i], targets)[:k])]
        if mine.size == 0:
            continue
        others = [_same_dtype(lists[o][i], targets)[:k] for o in lists if o != name]
        found = np.concatenate(others) if others else np.empty(0, dtype=mine.dtype)
        total += int((~np.isin(mine, found)).sum())
    return total


def _same_dtype(cands: npt.NDArray[Any], like: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``cands`` spelled in the kind of ``like`` by the one id rule (``retrieval.ids``), in order;
    those that cannot be an id of that kind (``"00123"`` or ``"sku-1"`` against int targets)
    are dropped, since they cannot match. Negative ids are ids like any other."""
    as_str = like.dtype.kind in "US"
    if cands.dtype.kind == ("U" if as_str else "i"):
        return cands
    ok, keys = id_keys(cands, as_str=as_str)
    return keys if ok.all() else keys[ok]


def format_report(report: EvalReport) -> str:
    """One block per k (recall, recall of new items, hit rate, unique hits), then latency."""
    rows = [*report.sources.items(), ("BLEND", report.blend)]
    rows += [(f"BLEND:{name}", stats) for name, stats in report.variants.items()]
    width = max(14, *(len(name) + 1 for name, _ in rows))
    lines = [f"test users: {report.users}"]
    for k in report.ks:
        lines.append(
            f"{'@' + str(k):<{width}}{'recall':>10}{'recall_new':>12}{'hitrate':>10}"
            f"{'unique_hits':>13}{'returned':>10}"
        )
        for name, stats in rows:
            unique = stats.get(f"unique_hits@{k}")
            lines.append(
                f"{name:<{width}}{stats[f'recall@{k}']:>10.4f}{stats[f'recall_new@{k}']:>12.4f}"
                f"{stats[f'hitrate@{k}']:>10.4f}"
                f"{'-' if unique is None else int(unique):>13}"
                f"{stats.get(f'candidates@{k}', 0.0):>10.0f}"
            )
        lines.append("")
    lines.append(
        f"{'latency':<{width}}{'p50_ms':>10}{'p99_ms':>12}{'over_timeout':>14}{'live_timeouts':>15}"
    )
    for name, stats in rows:
        if "p50_ms" in stats:
            late = ""
            if "over_timeout" in stats:
                late = f"{int(stats['over_timeout']):>14}{int(stats['live_timeouts']):>15}"
            lines.append(f"{name:<{width}}{stats['p50_ms']:>10.2f}{stats['p99_ms']:>12.2f}{late}")
    lines.append(
        "recall merges the answers every source gave with no clock running; over_timeout: calls "
        "slower than the source's timeout_ms; live_timeouts: timeouts inside the timed blend()"
    )
    if "coverage" in report.blend:
        lines.append(f"blend catalog coverage: {report.blend['coverage']:.4f}")
    if report.quota_sensitivity:
        k = report.ks[-1]
        base = report.quota_sensitivity["_base"]["recall"]
        lines.append(f"quota blend recall@{k} with equal quotas: {base:.4f}; moving one quota:")
        for name, row in report.quota_sensitivity.items():
            if name != "_base":
                lines.append(
                    f"  {name:<14} +10%: {row['+10%']:.4f} ({row['+10%'] - base:+.4f})   "
                    f"-10%: {row['-10%']:.4f} ({row['-10%'] - base:+.4f})"
                )
    return "\n".join(lines)


def _iso(ts: float) -> str:
    from datetime import UTC

    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_for_eval(
    config: RetrievalConfig,
    events: Path | None,
    train: Path | None,
    test: Path | None,
    split_time: str | None,
    test_fraction: float | None,
    max_users: int | None,
    seed: int = 0,
) -> tuple[Split, Path]:
    """Read the log(s) and split them as the CLI asked."""
    from retrieval.offline.build import needed_segments

    segs = needed_segments(config)
    if train is not None or test is not None:
        if train is None or test is None or events is not None:
            raise EvalError("give either --events with a split, or both --train and --test")
        train_log = read_events(train, config.events.columns, segs)
        test_log = read_events(test, config.events.columns, segs)
        return split_from_files(train_log, test_log, max_users, seed), train
    if events is None:
        raise EvalError("give --events PATH (with --split-time or --test-fraction)")
    if (split_time is None) == (test_fraction is None):
        raise EvalError("give exactly one of --split-time T or --test-fraction F")
    log = read_events(events, config.events.columns, segs)
    cutoff = (
        parse_cutoff(split_time)
        if split_time is not None
        else cutoff_for_fraction(log, test_fraction or 0)
    )
    return split_by_time(log, cutoff, max_users, seed), events
