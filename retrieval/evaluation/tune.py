"""``retrieval tune``: fit a config's hyperparameters to the user's own log.

Defaults are guesses about someone else's data; the log says what works on this one. The log
is split into a fit part and a validation part shaped like a next-items test
(``holdout_split``). Each learned source is then searched alone by its validation recall at the
config's k, one parameter at a time (coordinate descent over a short list of values each kind
declares in ``SEARCH_SPACES``, keeping a change only when it measures better). Serving-only
parameters reuse the trial's build. Last, the blend (exclude seen or not, strategy, rrf_k,
weights) is searched on the tuned sources' answers, merged by the serving blender itself.

Why coordinate descent and not a sampler such as optuna's TPE: with a few dozen trials of a
few seconds each, a sampler's model has too little to learn from, while a fixed, documented
order is deterministic, explains every choice in the report ("alpha 40 -> 100: +0.031"), and
needs no new dependency. The time budget only cuts the search short (reported); with the
same seed and a budget that is not reached, two runs try the same trials and choose the same.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml
from tqdm import tqdm

from blender.calibration import Calibration
from retrieval.artifacts import build_params_hash_input, params_hash
from retrieval.config import RetrievalConfig, SourceConfig
from retrieval.evaluation.evaluate import (
    Runs,
    Split,
    collect,
    combine_all,
    fit_calibration,
    for_artifacts,
    hits_and_unique,
    holdout_split,
    log_grid,
    metrics,
    recall_curve,
    seen_items,
    source_lists,
)
from retrieval.offline.build import build, needed_segments
from retrieval.offline.events import EventLog, read_events
from retrieval.online.retriever import Retriever, make_blender

__all__ = ["SEARCH_SPACES", "Trial", "TuneResult", "tune", "write_tuned_yaml"]

logger = logging.getLogger(__name__)

Space = Sequence[tuple[str, Sequence[Any]]]

# What is searched per kind, in order (the first parameters move recall most). Values span what
# the literature and common practice use; none is fitted to one log. Parameters a kind does not
# have (an older or custom Params model) are skipped.
SEARCH_SPACES: Mapping[str, Space] = {
    "ann": (
        ("alpha", (1.0, 10.0, 40.0, 100.0, 300.0, 1000.0)),  # implicit-feedback confidence
        ("factors", (32, 64, 128)),
        ("regularization", (0.001, 0.01, 0.1, 1.0)),
        ("iterations", (8, 15, 30)),
        ("metric", ("dot", "angular")),
        ("history", (5, 20, 50)),
        ("recency_decay", (0.7, 0.9, 1.0)),
    ),
    "covisitation": (
        ("window", (2, 5, 10, 20)),
        ("distance_weight", ("constant", "inverse")),
        ("direction", ("symmetric", "forward")),
        ("top_k", (50, 100, 300, None)),  # None: every neighbour
        ("history", (3, 10, 20, 50)),
        ("recency_decay", (0.5, 0.7, 0.9, 1.0)),
        ("self_weight", (0.0, 0.5, 1.0, 2.0)),
        ("expand_decay", (0.0, 0.5)),  # any value above 0 ranks the same: on or off
    ),
    "itemcf": (
        ("model", ("cosine", "bm25", "tfidf")),
        ("neighbours", (20, 50, 100, 200, 500)),
        ("history", (3, 10, 20, 50)),
        ("recency_decay", (0.5, 0.7, 0.9, 1.0)),
        ("expand_decay", (0.0, 0.5)),
    ),
    "popularity": (("half_life_days", (0.25, 1.0, 3.0, 7.0, 30.0, 180.0)),),
    "recent": (
        ("history", (5, 20, 50, 200)),
        ("recency_decay", (0.5, 0.8, 0.9, 1.0)),
    ),
}
RRF_KS = (5.0, 20.0, 60.0, 200.0)
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
STRATEGIES = ("rrf", "calibrated", "score", "quota")
_BLEND_SHARE = 0.25  # of the budget kept for the final build and the blend search
_BETTER = 1e-4  # a change must gain at least this much recall to be kept


@dataclass
class Trial:
    """One configuration tried, kept so the report can explain every choice. ``chosen`` marks
    the one kept at the end of its stage (a source's, or the blend's); ``recall`` is NaN and
    ``note`` says why when the trial failed."""

    stage: str  # "source" or "blend"
    source: str | None
    params: dict[str, Any]
    recall: float  # a source's recall@k; a blend's recall averaged over blend_depths(k)
    seconds: float
    chosen: bool = False
    note: str = ""


@dataclass
class TuneResult:
    """A tuning run: the tuned ``config`` (what ``write_tuned_yaml`` writes), every trial in
    the order tried, and validation recall before and after. ``budget_exhausted`` says the time
    budget cut the search short, so a longer budget may find better."""

    config: RetrievalConfig
    trials: list[Trial]
    k: int
    users: int
    before: dict[str, float]  # validation recall@k per source and "blend", as configured
    after: dict[str, float]
    budget_exhausted: bool
    seconds: float
    calibration: Calibration | None = None  # rank curves, when the chosen strategy needs them
    table: dict[str, Any] = field(default_factory=dict)  # tuned: metrics at blend_depths(k)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    overlap: dict[str, dict[str, int]] = field(default_factory=dict)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)

    def report_data(self, title: str, subtitle: str) -> dict[str, Any]:
        """What ``retrieval.evaluation.report`` draws for a tuning run (validation figures)."""
        k = self.k
        rows = {
            name: {**self.table.get("rows", {}).get(name, {}), f"before@{k}": before}
            for name, before in self.before.items()
        }
        return {
            "title": title,
            "subtitle": subtitle,
            "curves": self.curves,
            "table": {"ks": self.table.get("ks", [k]), "rows": rows},
            "overlap": self.overlap,
            "latency": self.latency,
            "trials": [asdict(t) for t in self.trials],
            "notes": [
                f"Validation: {self.users} users held out of the log (holdout_split); recall@{k}.",
                "Budget reached: the search was cut short."
                if self.budget_exhausted
                else "The search finished within the budget.",
            ],
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what ``retrieval tune --json`` prints): the figures, every trial and the
        tuned config as plain data; the calibration and the report's tables are left out."""
        return {
            "k": self.k,
            "validation_users": self.users,
            "before": self.before,
            "after": self.after,
            "budget_exhausted": self.budget_exhausted,
            "seconds": round(self.seconds, 1),
            "trials": [asdict(t) for t in self.trials],
            "config": self.config.model_dump(mode="json"),
        }


class _Clock:
    """The budget: how long is left, and whether a trial as long as the last one still fits."""

    def __init__(self, minutes: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = minutes * 60.0
        self.exhausted = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, estimate_s: float, until_s: float) -> bool:
        ok = self.elapsed() + estimate_s <= until_s
        self.exhausted |= not ok
        return ok


def tune(
    config: RetrievalConfig,
    events_path: Path,
    *,
    budget_minutes: float = 15.0,
    seed: int = 0,
    holdout: float = 0.1,
    users: int = 2000,
    workers: int = 2,
    progress: bool | None = None,
    events: EventLog | None = None,
) -> TuneResult:
    """Search every source's parameters, then the blend; returns the tuned config."""
    show = sys.stderr.isatty() if progress is None else progress
    clock = _Clock(budget_minutes)
    if events is None:
        events = read_events(events_path, config.events.columns, needed_segments(config))
    split = holdout_split(events, holdout, users, seed=seed)
    k = min(config.k, len(split.train.item_ids))
    blend_trials = 2 + len(STRATEGIES) + len(RRF_KS) + 2 * len(WEIGHTS) * len(config.sources)
    planned = sum(len(v) for sc in config.sources for _, v in _space(sc)) + blend_trials
    trials: list[Trial] = []
    with (
        tempfile.TemporaryDirectory(prefix="retrieval-tune-") as tmp,
        tqdm(total=planned, desc="tune", unit="trial", disable=not show) as bar,
    ):
        search = _SourceSearch(config, split, events_path, k, workers, Path(tmp), clock, bar)
        tunable = [sc for sc in config.sources if _space(sc)]
        # Each source as configured first: how long one of its trials takes sets its share.
        for sc in tunable:
            search.start(sc)
        source_budget = clock.budget_s * (1 - _BLEND_SHARE)
        for i, sc in enumerate(tunable):
            need = [search.need_s(other) for other in tunable[i:]]
            left = max(source_budget - clock.elapsed(), 0.0)
            until = clock.elapsed() + left * need[0] / max(sum(need), 1e-9)
            search.run(sc, until)
        params = {sc.name: search.best.get(sc.name, dict(sc.params)) for sc in config.sources}
        trials.extend(search.trials)
        bar.set_description("tune: blend")
        validate = _Validation(split, events_path, k, workers, Path(tmp))
        before = validate.figures(validate.answers(config, "before"), config)[0]
        sources_tuned = _with_params(config, params)
        runs = validate.answers(sources_tuned, "after")
        found, tuned = _tune_blend(config, sources_tuned, validate, runs, clock, bar)
        trials.extend(found)
        after, report = validate.figures(runs, tuned)
        calibration = None
        if tuned.blend.strategy == "calibrated":
            calibration = fit_calibration(runs[1], split, tuned.blend.exclude_seen, k)
    return TuneResult(
        config=tuned,
        trials=trials,
        k=k,
        users=len(split.users),
        before=before,
        after=after,
        budget_exhausted=clock.exhausted,
        seconds=clock.elapsed(),
        calibration=calibration,
        **report,
    )


def _space(sc: SourceConfig) -> list[tuple[str, Sequence[Any]]]:
    """The kind's search space, restricted to parameters its Params model has."""
    fields = sc.source_class.Params.model_fields
    return [(p, v) for p, v in SEARCH_SPACES.get(sc.kind, ()) if p in fields]


def _with_params(config: RetrievalConfig, params: Mapping[str, dict[str, Any]]) -> RetrievalConfig:
    """``config`` with each source's params replaced, validated as a file would be."""
    doc = config.model_dump(mode="json")
    for s in doc["sources"]:
        if s["name"] in params:
            s["params"] = params[s["name"]]
    return RetrievalConfig.load(doc, config.origin, base_dir=config.base_dir, environ={})


class _SourceSearch:
    """Coordinate descent over one source's parameters, each trial that source alone."""

    def __init__(
        self,
        config: RetrievalConfig,
        split: Split,
        events_path: Path,
        k: int,
        workers: int,
        tmp: Path,
        clock: _Clock,
        bar: tqdm[Any],
    ) -> None:
        self.config, self.split, self.events_path = config, split, events_path
        self.k, self.workers, self.tmp, self.clock, self.bar = k, workers, tmp, clock, bar
        self.trials: list[Trial] = []
        self.seen = seen_items(split)
        self.best: dict[str, dict[str, Any]] = {}  # params found so far, per source
        self._state: dict[str, tuple[float, float, Trial]] = {}  # best recall, last s, trial
        self._builds: dict[str, Path] = {}

    def start(self, sc: SourceConfig) -> None:
        """Measure ``sc`` as configured: the baseline its search must beat."""
        self.bar.set_description(f"tune: {sc.name}")
        params = dict(sc.params)
        recall, seconds = self._trial(sc, params, "as configured")
        self.best[sc.name] = params
        self._state[sc.name] = (recall, seconds, self.trials[-1])

    def need_s(self, sc: SourceConfig) -> float:
        """Seconds the whole search of ``sc`` would take at the pace of its first trial."""
        n = sum(len(values) for _, values in _space(sc))
        return n * self._state[sc.name][1]

    def run(self, sc: SourceConfig, until_s: float) -> None:
        """Coordinate descent from ``start``'s baseline until ``until_s`` (seconds into the
        budget): each parameter in turn takes the value that measures best, if any beats it."""
        self.bar.set_description(f"tune: {sc.name}")
        best, last_s, chosen = self._state[sc.name]
        current = self.best[sc.name]
        for name, values in _space(sc):
            here = getattr(_resolved(sc, current), name)
            for value in values:
                if value == here:
                    continue
                if not self.clock.allows(last_s, until_s):
                    self.bar.update(1)
                    continue
                candidate = {**current, name: value}
                try:
                    _resolved(sc, candidate)
                except ValueError as exc:  # e.g. a value out of this kind's allowed range
                    logger.debug("skip %s=%r for %s: %s", name, value, sc.name, exc)
                    self.bar.update(1)
                    continue
                try:
                    recall, last_s = self._trial(sc, candidate, f"{name}={value!r}")
                except Exception as exc:  # one bad combination must not lose the whole search
                    logger.warning("tune: %s %s=%r failed: %s", sc.name, name, value, exc)
                    self.trials.append(
                        Trial(
                            "source", sc.name, candidate, float("nan"), 0.0, note=f"failed: {exc}"
                        )
                    )
                    self.bar.update(1)
                    continue
                if recall > best + _BETTER:
                    best, current, chosen = recall, candidate, self.trials[-1]
        chosen.chosen = True
        self.best[sc.name] = current
        self._builds = {k: v for k, v in self._builds.items() if not k.startswith(f"{sc.name}/")}
        shutil.rmtree(self.tmp / sc.name, ignore_errors=True)

    def _trial(self, sc: SourceConfig, params: dict[str, Any], note: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        cfg = _alone(self.config, sc, params)
        only = cfg.sources[0]
        key = f"{sc.name}/" + params_hash(only.kind, build_params_hash_input(only.resolved_params))
        artifacts = self._builds.get(key)
        if artifacts is None:
            artifacts = self.tmp / key[: len(sc.name) + 17]
            build(cfg, self.events_path, artifacts, events=self.split.train, progress=False)
            self._builds[key] = artifacts
        served = for_artifacts(cfg, artifacts, self.k)
        runs = collect(served, self.split, self.k, self.workers, False, live_blend=False)
        lists = source_lists(runs, sc.name, cfg.blend.exclude_seen, self.k)
        recall = metrics(lists, self.split, self.seen, [self.k])[f"recall@{self.k}"]
        seconds = time.perf_counter() - t0
        self.trials.append(Trial("source", sc.name, params, recall, seconds, note=note))
        self.bar.update(1)
        self.bar.set_postfix_str(f"{sc.name} {note}: {recall:.4f}")
        return recall, seconds


def _resolved(sc: SourceConfig, params: Mapping[str, Any]) -> Any:
    """The kind's Params for ``params`` (raises ValueError, pydantic's, when invalid)."""
    return sc.source_class.Params(**params)


def _alone(config: RetrievalConfig, sc: SourceConfig, params: dict[str, Any]) -> RetrievalConfig:
    """A config with only ``sc`` (with ``params``), blending it as plainly as possible."""
    doc = config.model_dump(mode="json")
    doc["sources"] = [{**sc.model_dump(mode="json"), "params": params, "quota": None}]
    doc["blend"].update(strategy="rrf", fallback=None, calibration=None)
    return RetrievalConfig.load(doc, config.origin, base_dir=config.base_dir, environ={})


class _Validation:
    """Builds a whole config on the fit part and scores it on the validation users."""

    def __init__(self, split: Split, events_path: Path, k: int, workers: int, tmp: Path) -> None:
        self.split, self.events_path, self.k, self.workers, self.tmp = (
            split,
            events_path,
            k,
            workers,
            tmp,
        )
        self.seen = seen_items(split)

    def answers(self, config: RetrievalConfig, label: str) -> tuple[RetrievalConfig, Runs]:
        """Every source's answers for the validation users (curves are fitted here, later)."""
        artifacts = self.tmp / label
        build(config, self.events_path, artifacts, events=self.split.train, progress=False)
        served = for_artifacts(config, artifacts, self.k)
        if served.blend.strategy == "calibrated":  # its curves are cross-fitted by the scorer
            served = _blend_changed(served, strategy="rrf")
        runs = collect(served, self.split, self.k, self.workers, False, live_blend=False)
        return served, runs

    def figures(
        self, answers: tuple[RetrievalConfig, Runs], blend: RetrievalConfig
    ) -> tuple[dict[str, float], dict[str, Any]]:
        """Recall@k per source and for ``blend``'s settings; curves, overlap and latency."""
        served, runs = answers
        k, split, seen = self.k, self.split, self.seen
        variant = served.model_copy(
            update={"blend": blend.blend, "sources": _weights_of(served, blend)}
        )
        with Retriever(served) as retriever:
            merged = _BlendScorer(runs, split, seen, k).lists(variant, retriever)
        lists = {n: source_lists(runs, n, blend.blend.exclude_seen, k) for n in runs.answers}
        depths = blend_depths(k)
        table = {n: metrics(v, split, seen, depths) for n, v in {**lists, "blend": merged}.items()}
        recall = {n: row[f"recall@{k}"] for n, row in table.items()}
        grid = log_grid(k)
        curves = {n: recall_curve(v, split, grid) for n, v in lists.items()}
        curves["blend"] = recall_curve(merged, split, grid)
        latency = {
            n: {"p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99))}
            for n, v in runs.latency_ms.items()
            if v.size
        }
        report = {
            "table": {"ks": depths, "rows": table},
            "curves": curves,
            "overlap": hits_and_unique(lists, split, k),
            "latency": latency,
        }
        return recall, report


def _weights_of(served: RetrievalConfig, other: RetrievalConfig) -> list[SourceConfig]:
    """``served``'s sources with ``other``'s weights and quotas (same names, same order)."""
    by_name = {sc.name: sc for sc in other.sources}
    return [
        sc.model_copy(update={"weight": by_name[sc.name].weight, "quota": by_name[sc.name].quota})
        for sc in served.sources
    ]


def _tune_blend(
    original: RetrievalConfig,
    tuned: RetrievalConfig,
    validate: _Validation,
    answers: tuple[RetrievalConfig, Runs],
    clock: _Clock,
    bar: tqdm[Any],
) -> tuple[list[Trial], RetrievalConfig]:
    """Search the blend on the tuned sources' answers (cheap: every trial re-merges answers in
    hand): whether to exclude seen items, then each strategy, and for the strategies that use
    them, each source's weight (and rrf_k) by coordinate descent; the best branch wins.

    Trials are scored by recall averaged over ``blend_depths`` (k, k/10, k/50): the next stage
    may read only the head of the slate, so a blend that wins at k by burying the best
    candidates is not better."""
    served, runs = answers
    scorer = _BlendScorer(runs, validate.split, validate.seen, validate.k)
    trials: list[Trial] = []
    last_s = 0.0

    with Retriever(served) as retriever:

        def score(variant: RetrievalConfig, note: str, force: bool = False) -> float | None:
            nonlocal last_s
            if not force and not clock.allows(last_s, clock.budget_s):
                bar.update(1)
                return None
            t = time.perf_counter()
            recall = scorer.recall(variant, retriever)
            last_s = time.perf_counter() - t
            trials.append(Trial("blend", None, _blend_params(variant), recall, last_s, note=note))
            bar.update(1)
            bar.set_postfix_str(f"blend {note}: {recall:.4f}")
            return recall

        def descend(
            start: RetrievalConfig, start_score: float, moves: list[tuple[str, Any]]
        ) -> tuple[RetrievalConfig, float, Trial]:
            """Coordinate descent from ``start`` over moves ("rrf_k" or a source, value)."""
            best_cfg, best, chosen = start, start_score, trials[-1]
            for what, value in moves:
                if what == "rrf_k":
                    if value == best_cfg.blend.rrf_k:
                        continue
                    variant, note = _blend_changed(best_cfg, rrf_k=value), f"rrf_k={value:g}"
                else:
                    if value == best_cfg.source(what).weight:
                        continue
                    variant = _weight_changed(best_cfg, what, value)
                    note = f"{best_cfg.blend.strategy}: {what}.weight={value:g}"
                got = score(variant, note)
                if got is not None and got > best + _BETTER:
                    best_cfg, best, chosen = variant, got, trials[-1]
            return best_cfg, best, chosen

        start = _blend_changed(served, strategy=original.blend.strategy)
        first = score(start, "as configured", force=True)
        assert first is not None
        best_cfg, best, chosen = start, first, trials[-1]
        flipped = _blend_changed(start, exclude_seen=not start.blend.exclude_seen)
        got = score(flipped, f"exclude_seen={str(flipped.blend.exclude_seen).lower()}")
        if got is not None and got > best + _BETTER:
            best_cfg, best, chosen = flipped, got, trials[-1]
        exclude_seen = best_cfg.blend.exclude_seen
        weights = [(sc.name, w) for sc in served.sources for w in WEIGHTS]
        for strategy in STRATEGIES:
            branch = _blend_changed(served, strategy=strategy, exclude_seen=exclude_seen)
            if _blend_params(branch) == _blend_params(start):
                got = first
                trials[0].note += f" ({strategy})"
            else:
                got = score(branch, f"strategy={strategy}")
            if got is None:
                continue
            moves: list[tuple[str, Any]] = []
            if strategy == "rrf":
                moves = [("rrf_k", v) for v in RRF_KS] + weights
            elif strategy == "score":
                moves = weights
            found, found_score, found_trial = descend(branch, got, moves)
            if found_score > best + _BETTER:
                best_cfg, best, chosen = found, found_score, found_trial
        chosen.chosen = True
    result = tuned.model_copy(
        update={
            "blend": best_cfg.blend.model_copy(update={"calibration": None}),
            "sources": _weights_of(tuned, best_cfg),
        }
    )
    return trials, result


def blend_depths(k: int) -> list[int]:
    """Where a blend is judged: k, k/10 and k/50 (20, 100 and 1,000 for k = 1,000)."""
    return sorted({max(1, k // 50), max(1, k // 10), k})


def _blend_changed(config: RetrievalConfig, **changes: Any) -> RetrievalConfig:
    return config.model_copy(update={"blend": config.blend.model_copy(update=changes)})


def _weight_changed(config: RetrievalConfig, name: str, weight: float) -> RetrievalConfig:
    sources = [
        sc.model_copy(update={"weight": weight}) if sc.name == name else sc for sc in config.sources
    ]
    return config.model_copy(update={"sources": sources})


def _blend_params(config: RetrievalConfig) -> dict[str, Any]:
    b = config.blend
    out: dict[str, Any] = {"strategy": b.strategy, "exclude_seen": b.exclude_seen}
    if b.strategy == "rrf":
        out["rrf_k"] = b.rrf_k
    if b.strategy in ("rrf", "score"):
        out["weights"] = {sc.name: sc.weight for sc in config.sources}
    return out


class _BlendScorer:
    """Blend recall on the validation users; calibrated curves are cross-fitted (each half of
    the users is merged with curves measured on the other half), so they are never scored on
    the users they were fitted to."""

    def __init__(self, runs: Runs, split: Split, seen: list[npt.NDArray[Any]], k: int) -> None:
        self.runs, self.split, self.seen, self.k = runs, split, seen, k
        n = len(runs.requests)
        self.halves = (np.arange(0, n, 2), np.arange(1, n, 2))
        self._curves: dict[bool, tuple[dict[str, Any], dict[str, Any]]] = {}

    def lists(self, variant: RetrievalConfig, retriever: Retriever) -> list[npt.NDArray[Any]]:
        if variant.blend.strategy != "calibrated":
            blender = make_blender(variant, retriever.sources)
            try:
                return combine_all(blender, self.runs.requests, self.runs.answers)
            finally:
                blender.close()
        out: list[npt.NDArray[Any]] = [np.empty(0)] * len(self.runs.requests)
        fitted = self.curves(variant.blend.exclude_seen)
        for half, curves in zip(self.halves, fitted[::-1], strict=True):
            blender = make_blender(variant, retriever.sources, curves)
            try:
                reqs = [self.runs.requests[i] for i in half]
                answers = {n: [a[i] for i in half] for n, a in self.runs.answers.items()}
                for i, ids in zip(half, combine_all(blender, reqs, answers), strict=True):
                    out[i] = ids
            finally:
                blender.close()
        return out

    def curves(self, exclude_seen: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        """Dense curves fitted on each half (for merging the other)."""
        if exclude_seen not in self._curves:
            depth = self.k + max(len(r.history) for r in self.runs.requests) + 1
            pair = []
            for half in self.halves:
                cal = fit_calibration(
                    _subset(self.runs, half), _split_subset(self.split, half), exclude_seen, self.k
                )
                pair.append({n: c.dense(depth) for n, c in cal.curves.items()})
            self._curves[exclude_seen] = (pair[0], pair[1])
        return self._curves[exclude_seen]

    def recall(self, variant: RetrievalConfig, retriever: Retriever) -> float:
        """Recall averaged over ``blend_depths``."""
        lists = self.lists(variant, retriever)
        depths = blend_depths(self.k)
        got = metrics(lists, self.split, self.seen, depths)
        return float(np.mean([got[f"recall@{d}"] for d in depths]))


def _subset(runs: Runs, idx: npt.NDArray[np.intp]) -> Runs:
    return Runs(
        requests=[runs.requests[i] for i in idx],
        answers={n: [a[i] for i in idx] for n, a in runs.answers.items()},
        latency_ms={n: v[idx] for n, v in runs.latency_ms.items()},
        over_timeout=runs.over_timeout,
        live_timeouts=runs.live_timeouts,
        blend_latency_ms=runs.blend_latency_ms,
    )


def _split_subset(split: Split, idx: npt.NDArray[np.intp]) -> Split:
    return Split(
        train=split.train,
        users=split.users[idx],
        targets=[split.targets[i] for i in idx],
        cutoff=split.cutoff,
    )


def write_tuned_yaml(
    result: TuneResult, original: RetrievalConfig, out: Path, command: str
) -> None:
    """The tuned config as YAML that ``retrieval validate`` accepts, with what was measured.

    It starts from the original file's own document (so ``${VAR}`` placeholders and unknown
    comments' intent survive) and changes only what the search chose; relative paths are
    rewritten to resolve from the new file's folder.
    """
    doc = _original_document(original)
    tuned = result.config
    by_name = {sc.name: sc for sc in tuned.sources}
    for s in doc.get("sources", []):
        sc = by_name.get(s.get("name"))
        if sc is None:
            continue
        if sc.params:
            s["params"] = dict(sc.params)
        s["weight"] = sc.weight
    blend = dict(doc.get("blend") or {})
    blend.update(
        strategy=tuned.blend.strategy,
        exclude_seen=tuned.blend.exclude_seen,
        rrf_k=tuned.blend.rrf_k,
    )
    blend.pop("calibration", None)
    if tuned.blend.strategy != "rrf":
        blend.pop("rrf_k", None)
    if result.calibration is not None:
        curves = out.with_name(out.stem + ".calibration.json")
        result.calibration.save(curves)
        blend["calibration"] = curves.name  # beside the YAML: relative paths resolve there
    doc["blend"] = blend
    _rebase_paths(doc, original.base_dir, out.resolve().parent)
    header = _header(result, original, command)
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(header + body, encoding="utf-8")
    tmp.replace(out)


def _original_document(config: RetrievalConfig) -> dict[str, Any]:
    path = Path(config.origin)
    if path.is_file():
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            return loaded
    return config.model_dump(mode="json", exclude_defaults=True)


def _rebase_paths(doc: dict[str, Any], old: Path, new: Path) -> None:
    import os

    def rebase(value: Any) -> Any:
        if not isinstance(value, str) or "$" in value or Path(value).is_absolute():
            return value
        return os.path.relpath((old / value).resolve(), new)

    if "artifacts" in doc:
        doc["artifacts"] = rebase(doc["artifacts"])
    blend = doc.get("blend") or {}
    if "blocklist" in blend:
        blend["blocklist"] = rebase(blend["blocklist"])


def _header(result: TuneResult, original: RetrievalConfig, command: str) -> str:
    """What was measured, as YAML comments: before/after recall and every value that changed."""
    k = result.k
    stamp = datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    cut = "; the budget cut the search short" if result.budget_exhausted else ""
    lines = [
        f"# Tuned from {original.origin} by `{command}`",
        f"# ({stamp}; {result.seconds / 60:.1f} min, {len(result.trials)} trials{cut}).",
        f"# Validation recall@{k}, {result.users} held-out users, as configured -> tuned:",
    ]
    width = max(len(n) for n in result.after)
    for name, after in result.after.items():
        before = result.before.get(name, float("nan"))
        lines.append(f"#   {name:<{width}}  {before:.4f} -> {after:.4f}")
    lines.append("# Changed:")
    tuned = {sc.name: sc for sc in result.config.sources}
    for sc in original.sources:
        new = tuned[sc.name]
        old_p, new_p = sc.resolved_params.model_dump(), new.resolved_params.model_dump()
        changes = [f"{p} {old_p[p]!r} -> {new_p[p]!r}" for p in new_p if new_p[p] != old_p[p]]
        if new.weight != sc.weight:
            changes.append(f"weight {sc.weight:g} -> {new.weight:g}")
        if changes:
            lines.append(f"#   {sc.name}: " + ", ".join(changes))
    ob, nb = original.blend, result.config.blend
    changes = [
        f"{f} {getattr(ob, f)!r} -> {getattr(nb, f)!r}"
        for f in ("strategy", "rrf_k", "exclude_seen")
        if getattr(ob, f) != getattr(nb, f)
    ]
    if changes:
        lines.append("#   blend: " + ", ".join(changes))
    lines.append("# Check it on a test split: retrieval eval THIS.yaml --train ... --test ...")
    return "\n".join(lines) + "\n"
