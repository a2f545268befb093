"""Nearest neighbours over item embeddings (exact, faiss IVF or annoy), queried with a user vector.

Embeddings come from the user (``embeddings`` + ``embedding_ids``: ``.npy`` files, e.g. a
two-tower model's item tower) or are learned from the event log with implicit's ALS. The query
vector is, in order of preference: the request's own ``vector``; the user's factors re-solved
from recent history (ALS closed form, cheap for ~20 items); the user's trained ALS factors (first
instead, unless the history is newer than the build, with ``user_vector: trained``); the
normalised weighted mean of the recent items' embeddings (user-supplied embeddings have no model
to re-solve with).

Every build has a JSON sidecar (``ann.json``) that is validated before any index file is
opened (annoy segfaults on a wrong dimension or a damaged file), and the index runs one
self-check query after loading. ``backend: auto`` (the default) serves small catalogues by exact
search (``sources.ann_exact``) and larger ones from a faiss IVF index (``sources.ann_faiss``);
annoy (``sources.ann_annoy``) stays an explicit choice: it cannot reach recall 0.95 at k = 1,000
over millions of items within the budget (issue 6), and where it was measured against exact
search it had far lower recall at little more speed (issue 10; benchmarks/README.md).

Each backend is a ``sources.vector_index.VectorIndex``: ``AnnSource`` opens one at load
(``_open_index``, the one place that picks by backend) and only calls its ``search``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from pydantic import Field
from threadpoolctl import threadpool_limits

from retrieval.artifacts import (
    ArtifactError,
    IdMap,
    read_versioned_json,
    require_finite,
    serving_view,
    source_root,
)
from retrieval.errors import InputError
from retrieval.types import (
    DEFAULT_EVENT_WEIGHTS,
    Deadline,
    Request,
    as_id_array,
    event_weight_vector,
)
from sources import ann_annoy, ann_exact, ann_faiss
from sources.ann_annoy import AnnoySearch, build_annoy
from sources.ann_exact import ExactSearch
from sources.ann_faiss import FaissIVF, build_ivf
from sources.base import Ranked, SkipSource, Source, SourceContext, SourceParams, register
from sources.history import sum_by_id, weighted_history
from sources.vector_index import VectorIndex, unit_rows

if TYPE_CHECKING:
    from retrieval.offline.events import EventLog

__all__ = ["EXACT_MAX_ITEMS", "AnnParams", "AnnSource", "resolve_backend", "resolve_metric"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
# backend: auto serves exact search up to this many items and faiss IVF above: up to here exact
# search is as fast as a calibrated IVF index at k = 1,000, with recall 1 and no index; beyond,
# IVF pulls ahead (`python benchmarks/ann_exact_vs_ivf.py`; the figures, and DIGINETICA's, are
# in benchmarks/README.md).
EXACT_MAX_ITEMS = 50_000
SIDECAR = "ann.json"
_FINITE_CHUNK = 262_144
_CALIBRATION_K = 1000  # the blend's default k: nprobe is calibrated for it, scaled for more
_CALIBRATION_QUERIES = 200

# Each backend's own sidecar checks, run before any of its files is opened.
_SIDECAR_CHECKS: dict[str, Callable[[Mapping[str, Any], Path, Path], None]] = {
    "exact": ann_exact.check_sidecar,
    "faiss": ann_faiss.check_sidecar,
    "annoy": ann_annoy.check_sidecar,
}


class AnnParams(SourceParams):
    """Nearest neighbours of a query vector among item embeddings: the user's own
    (``embeddings``, e.g. a two-tower model's item tower) or ALS factors learned from the log
    (``factors``, ``regularization``, ``iterations``, ``alpha``), searched by ``backend``.

    The query is the request's ``vector``; else, with ALS, the user's vector re-solved from the
    last ``history`` items (new users' too) or the user's trained factors, as ``user_vector``
    picks; with ``embeddings``, the recency-weighted mean of those items' vectors (given
    embeddings have no model to re-solve with). A request with none of these skips the source.

    History items stay candidates, ranked by their score like any other item (as the neighbour
    sources keep them; ``blend.exclude_seen`` is the filter that drops seen items): a re-solved
    session ranks its own items high, and where many next items are re-visits (DIGINETICA)
    dropping them costs much of the recall (textbook ALS: implicit's ``recommend`` loses the
    same with ``filter_already_liked_items``). ``exclude_history: true`` drops them in the
    source. Seed items are never returned.

    ``n_trees``, ``search_k`` and ``on_disk_build`` apply to ``backend: annoy`` only; ``nlist``,
    ``nprobe``, ``storage``, ``rerank``, ``balance_lists`` and ``target_recall`` to the faiss
    IVF index (``backend: faiss``, or ``auto`` above its exact-search limit).
    """

    embeddings: str | None = Field(
        None,
        description="Path of a `.npy` matrix of item embeddings, one finite row per item (e.g. "
        "a two-tower model's item tower); unset: ALS learns them from the log. A relative path "
        "resolves against the build's working directory (the builder only sees params).",
    )
    embedding_ids: str | None = Field(
        None,
        description="Path of a `.npy` array of item ids, one per `embeddings` row (no "
        "duplicates); only with `embeddings`. Unset: the rows follow the event log's item map "
        "(sorted external ids) and must be as many as the log's items.",
    )
    factors: int = Field(
        64,
        ge=1,
        le=4096,
        description="ALS: dimensions of the learned item and user vectors (unused with "
        "`embeddings`).",
    )
    regularization: float = Field(
        0.01,
        ge=0,
        description="ALS: L2 penalty on the factors, at training and when a user's vector is "
        "re-solved from history.",
    )
    iterations: int = Field(15, ge=1, description="ALS: alternating passes over users and items.")
    alpha: float = Field(
        40.0,
        gt=0,
        description="ALS: confidence scale, c = alpha x weighted count, at training and when "
        "re-solving a user. 40 is the value of Hu, Koren and Volinsky (2008), who introduced "
        "the model; 1 leaves observed items barely weighted above unobserved ones. The best "
        "value depends on the log: `retrieval tune` searches it.",
    )
    event_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS),
        description="Weight of each event type (unknown types weigh 1), times the log's weight "
        "column: the counts ALS learns from, and the weights of the history items the query is "
        "built from.",
    )
    metric: Literal["angular", "dot", "euclidean"] | None = Field(
        None,
        description="Similarity searched: `angular` (cosine), `dot` (inner product) or "
        "`euclidean` (scores are minus the distance). Unset: `dot` for ALS (x_u . y_i is the "
        "score ALS fits to the preference) and `angular` for `embeddings` (two-tower vectors "
        "are usually trained for cosine). Worth measuring per log: cosine over ALS vectors can "
        "beat dot, which favours long, popular vectors.",
    )
    n_trees: int = Field(
        32,
        ge=1,
        le=10_000,
        description="annoy: trees in the index; more find more true neighbours for a larger "
        "index and a longer build.",
    )
    search_k: int = Field(
        -1,
        description="annoy: nodes visited per query (more: better recall, slower); 0 or less: "
        "`n_trees` x the results asked for. Shrunk when the deadline is close.",
    )
    on_disk_build: bool | None = Field(
        None,
        description="annoy: build the index in its file instead of in memory; unset: on disk "
        "above a million items.",
    )
    history: int = Field(
        20,
        ge=0,
        le=10_000,
        description="Most recent history items the query vector is re-solved (ALS) or averaged "
        "(`embeddings`) from; 0: none (the request's vector, its seed items or the trained "
        "factors).",
    )
    recency_decay: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Weight of a history item relative to the next newer one (the newest "
        "weighs 1); 1.0: equal weights.",
    )
    user_vector: Literal["history", "trained"] = Field(
        "history",
        description="The query for a user ALS trained on. `history`: re-solved from the "
        "request's recent items whenever any are known, since the trained factors average the "
        "whole log's drifting taste (re-solved vectors found far more next items: "
        "benchmarks/README.md); `trained`: the trained factors, unless the request has seed "
        "items or a history newer than the build (a history without timestamps counts as "
        "newer).",
    )
    exclude_history: bool = Field(
        False,
        description="Drop the history items from this source's results. Off by default: they "
        "stay candidates, and `blend.exclude_seen` is the one filter for seen items. Seed items "
        "are never returned either way.",
    )
    seed: int = Field(
        0,
        description="Random seed of the build: ALS's initial factors, faiss's k-means, annoy's "
        "trees and the users sampled to calibrate `nprobe`.",
    )
    backend: Literal["auto", "exact", "faiss", "annoy"] = Field(
        "auto",
        description=f"`exact`: every item scored, no index; `faiss`: an IVF index; `annoy`: "
        f"an annoy forest, only when asked for (far lower recall than exact search at little "
        f"more speed where it was measured: benchmarks/README.md). `auto`: `exact` up to "
        f"{EXACT_MAX_ITEMS:,} items (`EXACT_MAX_ITEMS`: as fast as faiss there, with no index "
        f"and full recall), `faiss` above.",
    )
    nlist: int | None = Field(
        None,
        ge=1,
        description="faiss: k-means lists the items are split into; unset: about 4 sqrt(n) "
        "(at most n / 8); `balance_lists` may add more.",
    )
    nprobe: int | None = Field(
        None,
        ge=1,
        description="faiss: lists scanned per query (more: better recall, slower); unset: the "
        "smallest that reached `target_recall` at build, scaled up for k above 1,000. Shrunk "
        "when the deadline is close.",
    )
    storage: Literal["flat", "sq8"] = Field(
        "flat",
        description="faiss: `flat` keeps float32 vectors and exact scores; `sq8` one byte per "
        "dimension, 4x smaller with approximate scores (see `rerank`).",
    )
    rerank: int = Field(
        2000,
        ge=0,
        description="faiss with `storage: sq8`: the best this many candidates (at least k) are "
        "re-scored exactly from the item vectors; 0: sq8's approximate scores as they are. "
        "Unused with `flat`.",
    )
    balance_lists: bool = Field(
        True,
        description="faiss: split every k-means list larger than twice the mean by a k-means "
        "of its own members; clustered catalogues otherwise put several times the mean in a "
        "few lists, and the queries that hit them set the p99.",
    )
    target_recall: float = Field(
        0.97,
        gt=0,
        le=1,
        description="faiss: the build measures recall@1000 against exact search for users "
        "sampled from the log, with serving's metric and query rule, and keeps the smallest "
        "`nprobe` (doubling) that reaches this; a configured `nprobe` overrides it.",
    )

    serving_params = frozenset(
        {
            "history",
            "recency_decay",
            "user_vector",
            "exclude_history",
            "search_k",
            "nprobe",
            "rerank",
        }
    )


def resolve_metric(p: AnnParams) -> str:
    """The configured metric, else inner product for ALS and cosine for given embeddings."""
    if p.metric is not None:
        return p.metric
    return "angular" if p.embeddings is not None else "dot"


def resolve_backend(backend: str, n_items: int) -> str:
    """``auto``: exact search up to ``EXACT_MAX_ITEMS`` items, faiss IVF above."""
    if backend != "auto":
        return backend
    return "exact" if n_items <= EXACT_MAX_ITEMS else "faiss"


# --------------------------------------------------------------------------------------------
# build


def _load_embeddings(
    p: AnnParams, events: EventLog
) -> tuple[npt.NDArray[np.float32], IdMap | None]:
    """The user's matrix, validated and reordered to the sorted order of its ids."""
    assert p.embeddings is not None
    path = Path(p.embeddings).resolve()
    try:
        raw = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read embeddings ({exc})") from exc
    if raw.ndim != 2 or raw.shape[0] == 0 or raw.shape[1] == 0:
        raise InputError(f"{path}: embeddings must be a non-empty 2-D matrix, found {raw.shape}")
    if raw.dtype.kind not in "fiu":
        raise InputError(f"{path}: embeddings must be numeric, found dtype {raw.dtype}")
    n = raw.shape[0]
    for start in range(0, n, _FINITE_CHUNK):  # chunks, so a 10M-row mmap never loads at once
        bad = ~np.isfinite(raw[start : start + _FINITE_CHUNK]).all(axis=1)
        if bad.any():
            row = start + int(np.argmax(bad))
            raise InputError(f"{path}: row {row} has NaN or inf values (first bad row)")
    x = np.ascontiguousarray(raw, dtype=np.float32)
    if p.embedding_ids is None:
        if n != len(events.item_ids):
            raise InputError(
                f"{path}: {n} rows but the event log has {len(events.item_ids)} items; "
                "pass embedding_ids to name each row's item"
            )
        return x, None
    ids_path = Path(p.embedding_ids).resolve()
    try:
        ids = np.load(ids_path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{ids_path}: cannot read embedding ids ({exc})") from exc
    if ids.ndim != 1 or ids.shape[0] != n:
        raise InputError(
            f"{ids_path}: {ids.shape} ids for {n} embedding rows in {path}; expected one id per row"
        )
    id_map, codes = IdMap.from_values(as_id_array(ids))
    if len(id_map) != n:
        raise InputError(f"{ids_path}: {n - len(id_map)} duplicate ids")
    ordered = np.empty_like(x)
    ordered[codes] = x  # row order = the id map's dense order, so lookups are searchsorted
    return ordered, id_map


def _solve_user(
    y: npt.NDArray[np.float64],
    c: npt.NDArray[np.floating[Any]],
    gram: npt.NDArray[np.float64],
    regularization: float,
) -> npt.NDArray[np.float64]:
    """ALS's user step in closed form, as implicit's ``recalculate_user`` computes it:
    ``(YtY + reg I + Yh^T (C - I) Yh)^-1 Yh^T C 1`` for the history rows ``Yh`` with
    confidences ``C`` (cheap for ~20 items: one d x d solve)."""
    a = gram + regularization * np.eye(gram.shape[0])
    a += (y.T * (c - 1.0)) @ y
    return np.asarray(np.linalg.solve(a, y.T @ c), dtype=np.float64)


def _history_mean(
    y: npt.NDArray[np.float64], w: npt.NDArray[np.floating[Any]]
) -> npt.NDArray[np.float64]:
    """The ``w``-weighted sum of the history items' unit vectors ``y`` (rows): the query for
    given embeddings, which have no model to re-solve with (serving and calibration alike)."""
    return np.asarray((w[:, None] * unit_rows(y, np.float64)).sum(axis=0), dtype=np.float64)


def _calibration_queries(
    events: EventLog,
    items: npt.NDArray[Any],
    own_ids: IdMap | None,
    users: npt.NDArray[np.float32] | None,
    gram: npt.NDArray[np.float64] | None,
    p: AnnParams,
    n: int = _CALIBRATION_QUERIES,
) -> npt.NDArray[np.float32]:
    """Query vectors like the ones serving will build, for users sampled from the log, each at
    one of their events with the events up to it as history: the trained ALS factors under
    ``user_vector: trained``; else ALS's re-solve from the last ``history`` items (the
    ``recalculated`` rule), or for given embeddings the recency-weighted mean of those items'
    unit vectors (``history_mean``). nprobe calibrated on other queries than serving's would
    be sized for the wrong directions."""
    rng = np.random.default_rng(p.seed)
    if len(events) == 0:
        return np.empty((0, items.shape[1]), dtype=np.float32)
    picks = rng.choice(len(events), size=min(n, len(events)), replace=False)
    if users is not None and (gram is None or p.user_vector == "trained"):
        return np.asarray(users[events.users[picks]], dtype=np.float32)
    event_w = event_weight_vector(events, p.event_weights)
    first = np.searchsorted(events.users, events.users[picks], side="left")
    out = []
    for end, lo in zip(picks.tolist(), first.tolist(), strict=True):
        span = slice(max(lo, end + 1 - max(p.history, 1)), end + 1)
        codes = events.items[span]
        rows = codes if own_ids is None else own_ids.to_dense(events.item_ids.to_external(codes))
        rows = np.asarray(rows)[::-1]  # newest first
        w = np.asarray(p.recency_decay ** np.arange(rows.size) * event_w[span][::-1], np.float64)
        rows, w = rows[rows >= 0], w[rows >= 0]
        if rows.size == 0:
            continue
        rows, summed = sum_by_id(rows, w)  # repeats add up, as in serving
        y = np.asarray(items[rows], dtype=np.float64)
        if gram is not None:
            out.append(_solve_user(y, p.alpha * summed, gram, p.regularization))
        else:
            out.append(_history_mean(y, summed))
    if not out:
        return np.empty((0, items.shape[1]), dtype=np.float32)
    return np.asarray(out, dtype=np.float32)


def _fit_als(
    events: EventLog, p: AnnParams
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Item and user factors from implicit ALS (confidence = alpha x weighted event count)."""
    from implicit.cpu.als import AlternatingLeastSquares

    w = event_weight_vector(events, p.event_weights).astype(np.float32)
    shape = (len(events.user_ids), len(events.item_ids))
    user_items = sp.csr_matrix((w, (events.users, events.items)), shape=shape, dtype=np.float32)
    user_items.sum_duplicates()
    # implicit uses its own threads; a multi-threaded BLAS underneath oversubscribes the CPUs.
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=p.factors,
            regularization=p.regularization,
            alpha=p.alpha,
            iterations=p.iterations,
            random_state=p.seed,
        )
        model.fit(user_items, show_progress=False)
    items = np.ascontiguousarray(model.item_factors, dtype=np.float32)
    users = np.ascontiguousarray(model.user_factors, dtype=np.float32)
    return items, users


# --------------------------------------------------------------------------------------------
# source


@register("ann")
class AnnSource(Source[AnnParams]):
    """Nearest items to a query vector; seed items (and with ``exclude_history`` the history
    items) are excluded from the results."""

    Params = AnnParams
    reads = frozenset({"event_type", "weight"})

    def __init__(self, name: str, params: AnnParams, context: SourceContext) -> None:
        super().__init__(name, params, context)
        if context.artifacts is None:
            raise ArtifactError(f"source {name!r} (ann) needs built artifacts; run a build")
        # Resolved once, and every file checked against the manifest's SHA-256 before annoy or
        # faiss sees it: a bit-flipped annoy index loads, then aborts the process (or silently
        # ranks differently) on the first query.
        root = source_root(Path(context.artifacts), name)
        self.dir = root / name
        meta = self._read_sidecar(self.dir)
        self.meta = meta
        self.dims: int = meta["dims"]
        self.metric: str = meta["metric"]
        self.n_items: int = meta["n_items"]
        self.max_timestamp = float(meta["max_timestamp"])
        # Behind an index the vectors are read only at a request's history rows: mapped as
        # touched, so the process does not map the whole matrix (RSS) for a few rows a request.
        self._items = self._npy(
            self.dir / "item_factors.npy",
            (self.n_items, self.dims),
            fill=meta["backend"] == "exact",
        )
        ids_path = self.dir / "items.npy" if meta["own_ids"] else root / "ids" / "items.npy"
        self.item_ids = IdMap.load(ids_path, mmap=True)
        if len(self.item_ids) != self.n_items:
            raise ArtifactError(
                f"{ids_path}: {len(self.item_ids)} ids, {SIDECAR} says {self.n_items}"
            )
        self.user_ids: IdMap | None = None
        self._users: npt.NDArray[np.float32] | None = None
        self._gram: npt.NDArray[np.float64] | None = None
        if meta["user_factors"]:
            self.user_ids = IdMap.load(root / "ids" / "users.npy", mmap=True)
            self._users = self._npy(self.dir / "user_factors.npy", (len(self.user_ids), self.dims))
            self._gram = np.asarray(self._npy(self.dir / "gram.npy", (self.dims, self.dims)))
        self.backend: str = meta["backend"]
        allowed = ("exact", "faiss") if self.params.backend == "auto" else (self.params.backend,)
        if self.backend not in allowed:
            raise ArtifactError(
                f"{self.dir / SIDECAR}: built with backend {self.backend!r}, configured "
                f"{self.params.backend!r}; rebuild"
            )
        self.index: VectorIndex = self._open_index(meta)

    # ---- loading -------------------------------------------------------------------------

    @staticmethod
    def _read_sidecar(directory: Path) -> dict[str, Any]:
        """The sidecar, checked (its common fields, then the backend's own: everything annoy
        would crash on) before any index file is opened."""
        path = directory / SIDECAR
        meta = read_versioned_json(path, FORMAT_VERSION, "ann sidecar")
        dims, n, metric = meta.get("dims"), meta.get("n_items"), meta.get("metric")
        if not isinstance(dims, int) or dims <= 0:
            raise ArtifactError(f"{path}: dims must be a positive integer, found {dims!r}")
        if not isinstance(n, int) or n <= 0:
            raise ArtifactError(f"{path}: n_items must be a positive integer, found {n!r}")
        if metric not in ("angular", "dot", "euclidean"):
            raise ArtifactError(f"{path}: unknown metric {metric!r}")
        meta.setdefault("backend", "annoy")  # sidecars written before faiss have no key
        check = _SIDECAR_CHECKS.get(meta["backend"])
        if check is None:
            raise ArtifactError(f"{path}: unknown backend {meta['backend']!r}")
        check(meta, directory, path)
        return meta

    @staticmethod
    def _npy(path: Path, shape: tuple[int, int], fill: bool = True) -> npt.NDArray[Any]:
        try:
            arr: npt.NDArray[Any] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: unreadable ({exc}); rebuild") from exc
        if arr.shape != shape or arr.dtype.kind != "f":
            raise ArtifactError(f"{path}: shape {arr.shape} {arr.dtype}, expected {shape} floats")
        return serving_view(arr, fill)

    def _open_index(self, meta: dict[str, Any]) -> VectorIndex:
        """The backend's index over the item vectors, self-checked: the one place that picks
        by backend at load."""
        if self.backend == "exact":
            return ExactSearch(self._items, self.metric, self.dir / "item_factors.npy")
        if self.backend == "faiss":
            return FaissIVF(
                self.dir / ann_faiss.INDEX,
                meta,
                self._items,
                nprobe=self.params.nprobe,
                rerank=self.params.rerank,
                calibration_k=_CALIBRATION_K,
            )
        return AnnoySearch(
            self.dir / ann_annoy.INDEX,
            meta,
            self._items,
            n_trees=self.params.n_trees,
            search_k=self.params.search_k,
        )

    # ---- serving -------------------------------------------------------------------------

    def item_vectors(self) -> npt.NDArray[np.float32]:
        """The item vectors (memory-mapped, index order, not normalised), for exact baselines."""
        return self._items

    def item_index(self) -> IdMap:
        """External ids of the indexed rows (``item_vectors()[i]`` is item ``to_external(i)``)."""
        return self.item_ids

    def _user_row(self, user_id: Any) -> int:
        if user_id is None or self.user_ids is None:
            return -1
        return int(self.user_ids.to_dense([user_id])[0])

    def _check_vector(self, vector: Any) -> npt.NDArray[np.float32]:
        v = np.asarray(vector, dtype=np.float32)
        if v.ndim == 2 and v.shape[0] == 1:
            v = v[0]
        if v.ndim != 1 or v.shape[0] != self.dims:
            raise SkipSource(f"request vector has shape {v.shape}, the index has {self.dims} dims")
        if not np.isfinite(v).all():
            raise SkipSource("request vector has NaN or inf values")
        return v

    def query_vector(
        self, request: Request
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32], str]:
        """The query vector, the index rows to exclude (the seed items, and with
        ``exclude_history`` the history items) and which rule produced it."""
        ids, weights = weighted_history(
            request, self.params.history, self.params.recency_decay, self.params.event_weights
        )
        rows = self.item_ids.to_dense(ids) if ids.size else np.empty(0, dtype=np.int32)
        known = rows >= 0
        rows, weights = rows[known], weights[known].astype(np.float64)
        drop = rows if self.params.exclude_history else self._seed_rows(request)
        if request.vector is not None:
            return self._check_vector(request.vector), drop, "vector"
        u = self._user_row(request.user_id)
        stamps = request.history_timestamps
        fresh = (
            bool(request.seed_items)
            or self.params.user_vector == "history"
            or (
                bool(request.history)
                and (stamps is None or max(stamps, default=0.0) > self.max_timestamp)
            )
        )
        if u >= 0 and self._users is not None and (not fresh or rows.size == 0):
            return np.asarray(self._users[u], dtype=np.float32), drop, "user_factors"
        if rows.size == 0:
            why = "unknown user" if u < 0 else "user has no factors"
            raise SkipSource(f"no query vector: no request vector, {why}, no known history items")
        y = np.asarray(self._items[np.sort(rows)], dtype=np.float64)
        w = weights[np.argsort(rows)]
        if self._gram is not None:
            x = _solve_user(y, self.params.alpha * w, self._gram, self.params.regularization)
            how = "recalculated"
        else:
            x = unit_rows(_history_mean(y, w), np.float64)
            how = "history_mean"
        norm = float(np.linalg.norm(x))
        if not np.isfinite(norm) or norm == 0.0:
            raise SkipSource(f"no query vector: the {how} vector is degenerate")
        return x.astype(np.float32), drop, how

    def _seed_rows(self, request: Request) -> npt.NDArray[np.int32]:
        """Index rows of the request's seed items ("more like this" never returns the seed)."""
        if not request.seed_items:
            return np.empty(0, dtype=np.int32)
        rows = np.asarray(self.item_ids.to_dense(list(request.seed_items)))
        return rows[rows >= 0].astype(np.int32)

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        """Nearest items to the request's query vector (given, the user's, or the history mean) in
        the one vector index; seeds (and the history, with ``exclude_history``) are left out."""
        v, exclude, _ = self.query_vector(request)
        if self.metric == "angular":
            if not np.any(v):
                raise SkipSource("zero query vector under the angular metric")
            v = unit_rows(v)
        n = min(self.n_items, k + int(exclude.size))
        rows, scores = self.index.search(v, n, deadline)
        if exclude.size:
            keep = ~np.isin(rows, exclude)
            rows, scores = rows[keep], scores[keep]
        order = np.argsort(-scores, kind="stable")[:k]
        return self.item_ids.to_external(rows[order]), scores[order].astype(np.float32)

    def close(self) -> None:
        """Release the index (unmaps annoy's file); the retriever calls it only when no query
        runs."""
        self.index.close()

    # ---- build ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        events: EventLog,
        out_dir: Path,
        params: SourceParams,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, Any]:
        """Embeddings (given, or ALS), then the index (none for exact) and its sidecar, last."""
        if not isinstance(params, AnnParams):
            raise TypeError(f"expected AnnParams, got {type(params).__name__}")
        p = params
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        users: npt.NDArray[np.float32] | None = None
        own_ids: IdMap | None = None
        if p.embeddings is not None:
            items, own_ids = _load_embeddings(p, events)
            origin = "embeddings"
        elif p.embedding_ids is not None:
            raise InputError("embedding_ids given without embeddings")
        else:
            items, users = _fit_als(events, p)
            origin = "als"
            require_finite(items, f"{out_dir}: ALS item factors")
            require_finite(users, f"{out_dir}: ALS user factors")
        t_embed = time.perf_counter() - t0
        np.save(out_dir / "item_factors.npy", items, allow_pickle=False)
        if own_ids is not None:
            own_ids.save(out_dir / "items.npy")
        gram: npt.NDArray[np.float64] | None = None
        if users is not None:
            np.save(out_dir / "user_factors.npy", users, allow_pickle=False)
            gram = items.astype(np.float64).T @ items.astype(np.float64)
            np.save(out_dir / "gram.npy", gram, allow_pickle=False)
        t1 = time.perf_counter()
        n, dims = items.shape
        metric = resolve_metric(p)
        backend = resolve_backend(p.backend, n)
        common = {
            "format_version": FORMAT_VERSION,
            "backend": backend,
            "dims": int(dims),
            "metric": metric,
            "n_items": int(n),
            "max_timestamp": float(events.timestamps.max()) if len(events.timestamps) else 0.0,
            "own_ids": own_ids is not None,
            "user_factors": users is not None,
            "origin": origin,
        }
        on_disk = False
        if backend == "exact":
            meta: dict[str, Any] = dict(common)
        elif backend == "faiss":
            ivf = build_ivf(
                items,
                metric,
                out_dir / ann_faiss.INDEX,
                nlist=p.nlist,
                storage=p.storage,
                balance=p.balance_lists,
                seed=p.seed,
                queries=_calibration_queries(events, items, own_ids, users, gram, p),
                k=_CALIBRATION_K,
                target_recall=p.target_recall,
            )
            meta = {**common, **ivf}
            on_disk = True
        else:
            annoy, on_disk = build_annoy(
                items,
                metric,
                out_dir / ann_annoy.INDEX,
                n_trees=p.n_trees,
                seed=p.seed,
                on_disk_build=p.on_disk_build,
            )
            meta = {**common, **annoy}
        t_index = time.perf_counter() - t1
        (out_dir / SIDECAR).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if progress is not None:
            progress(len(events.timestamps))
        return {
            **meta,
            "on_disk_build": on_disk,
            "embed_s": round(t_embed, 3),
            "index_s": round(t_index, 3),
        }
