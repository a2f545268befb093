"""ANN per issue 10: exact search, backend auto, inner product for ALS, implicit's re-solve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

import sources.ann as ann_module
from retrieval.artifacts import ArtifactError
from retrieval.offline.events import EventLog
from retrieval.testing.contract import SourceContract
from retrieval.types import Deadline, Request
from sources.ann import EXACT_MAX_ITEMS, AnnParams, resolve_backend
from sources.ann_exact import ExactSearch, exact_top_k
from sources.ann_faiss import FaissIVF
from sources.base import SkipSource
from sources.history import weighted_history
from tests.test_ann import DIMS, N_ITEMS, T0, build, open_source, write_events

pytest.importorskip("faiss")


def block_log(path: Path, n_items: int = 300, n_users: int = 240, seed: int = 0) -> EventLog:
    """Users in 6 taste blocks, each with 12 clicks drawn from its block (Zipf-ish popularity)."""
    rng = np.random.default_rng(seed)
    per = n_items // 6
    pop = 1.0 / np.arange(1, per + 1) ** 0.8
    rows = []
    for u in range(n_users):
        base = (u % 6) * per
        for j, i in enumerate(rng.choice(per, size=12, p=pop / pop.sum())):
            rows.append((u, int(base + i), T0 + j))
    return write_events(path, rows)


@pytest.fixture
def als_log(tmp_path) -> EventLog:
    return block_log(tmp_path / "events.csv")


@pytest.fixture
def emb(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(N_ITEMS, DIMS)) * rng.lognormal(0, 0.5, (N_ITEMS, 1))).astype(np.float32)
    ids = np.arange(700, 700 + N_ITEMS)[rng.permutation(N_ITEMS)]
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "emb_ids.npy", ids)
    return tmp_path, x, ids


def emb_params(d: Path, **extra: Any) -> dict[str, Any]:
    return {"embeddings": str(d / "emb.npy"), "embedding_ids": str(d / "emb_ids.npy"), **extra}


class TestExactContract(SourceContract):
    def make_source(self, tmp_path):
        rows = [(u, (u * 7 + j) % 30, T0 + j) for u in range(30) for j in range(5)]
        events = write_events(tmp_path / "e.csv", rows)
        root, p = build(tmp_path, events, factors=4, iterations=3)  # the defaults: auto -> exact
        source = open_source(root, p)
        assert isinstance(source.index, ExactSearch)
        return source

    def known_request(self):
        return Request(user_id=3)


def oracle(x: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    if metric == "angular":
        return (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    if metric == "dot":
        return x @ q
    return -np.linalg.norm(x - q, axis=1)


@pytest.mark.parametrize("metric", ["dot", "angular", "euclidean"])
@pytest.mark.parametrize("k", [1, 37, N_ITEMS, N_ITEMS + 50])
def test_exact_backend_is_the_brute_force_top_k(emb, tmp_path, metric, k):
    d, x, ids = emb
    log = write_events(tmp_path / "e.csv", [(0, 1, T0)])
    root, p = build(d, log, **emb_params(d, backend="exact", metric=metric))
    source = open_source(root, p)
    assert source.backend == "exact" and not (root / "ann" / "index.ann").exists()
    for seed in range(3):
        q = np.random.default_rng(seed).normal(size=DIMS).astype(np.float32)
        got, scores = source.retrieve(Request(vector=q), k, Deadline.in_ms(1000))
        truth = oracle(x.astype(np.float64), q.astype(np.float64), metric)
        best = np.argsort(-truth, kind="stable")[: min(k, N_ITEMS)]
        assert got.tolist() == ids[best].tolist()
        np.testing.assert_allclose(scores, truth[best], rtol=1e-4, atol=1e-4)


def test_exact_backend_excludes_history(emb, tmp_path):
    d, x, ids = emb
    log = write_events(tmp_path / "e.csv", [(0, 1, T0)])
    root, p = build(d, log, **emb_params(d, backend="exact", metric="dot", exclude_history=True))
    source = open_source(root, p)
    q = np.random.default_rng(9).normal(size=DIMS).astype(np.float32)
    order = ids[np.argsort(-(x @ q))]
    hist = tuple(int(i) for i in order[[0, 2, 5]])
    got, _ = source.retrieve(Request(vector=q, history=hist), 10, Deadline.in_ms(1000))
    kept = [int(i) for i in order if int(i) not in hist][:10]
    assert got.tolist() == kept


def test_history_items_stay_candidates_unless_excluded(tmp_path, als_log):
    """By default the re-solved session's own items come back at their ALS rank (re-visits are
    a quarter of next items in session logs; ``blend.exclude_seen`` drops them where unwanted);
    ``exclude_history`` drops them in the source; a seed item is never returned."""
    root, p = build(tmp_path, als_log, factors=8, iterations=10)
    keep = open_source(root, p)
    drop = open_source(root, p.model_copy(update={"exclude_history": True}))
    ids = als_log.item_ids.to_external(als_log.items[als_log.users == 5])
    req = Request(history=tuple(int(i) for i in ids))
    v, excluded, _ = keep.query_vector(req)
    assert excluded.size == 0 and drop.query_vector(req)[1].size == np.unique(ids).size
    scores = np.load(root / "ann" / "item_factors.npy") @ v
    ranked = keep.item_index().to_external(np.argsort(-scores, kind="stable")).tolist()
    hist = set(ids.tolist())
    got_keep, _ = keep.retrieve(req, 60, Deadline.in_ms(1000))
    got_drop, _ = drop.retrieve(req, 60, Deadline.in_ms(1000))
    assert got_keep.tolist() == ranked[:60]
    assert hist & set(got_keep.tolist()) and not hist & set(got_drop.tolist())
    assert got_drop.tolist() == [i for i in ranked if i not in hist][:60]
    seed = ranked[0]
    got_seed, _ = keep.retrieve(
        Request(history=req.history, seed_items=(seed,)), 60, Deadline.in_ms(1000)
    )
    assert seed not in got_seed.tolist() and got_seed.size == 60


def test_metric_defaults_dot_for_als_angular_for_given_embeddings(emb, tmp_path, als_log):
    d, _, _ = emb
    root, _ = build(tmp_path / "als", als_log, factors=8, iterations=5)
    assert json.loads((root / "ann" / "ann.json").read_text())["metric"] == "dot"
    root, _ = build(d, als_log, **emb_params(d))
    assert json.loads((root / "ann" / "ann.json").read_text())["metric"] == "angular"
    root, _ = build(d, als_log, **emb_params(d, metric="dot"))
    assert json.loads((root / "ann" / "ann.json").read_text())["metric"] == "dot"


def test_dot_ranking_is_the_als_score_order(tmp_path, als_log):
    """The default serves ALS's own prediction x_u . y_i, not cosine (which reorders items of
    different norms: popular items have long vectors)."""
    root, p = build(tmp_path, als_log, factors=8, iterations=10, user_vector="trained")
    source = open_source(root, p)
    items = np.load(root / "ann" / "item_factors.npy").astype(np.float64)
    users = np.load(root / "ann" / "user_factors.npy").astype(np.float64)
    n = len(als_log.item_ids)
    differs = 0
    for u in (0, 7, 101):
        got, scores = source.retrieve(Request(user_id=u), n, Deadline.in_ms(1000))
        rows = source.item_index().to_dense(got)
        als = items @ users[u]
        np.testing.assert_allclose(scores, als[rows], rtol=1e-4, atol=1e-5)
        assert np.all(np.diff(als[rows]) <= 1e-6)  # non-increasing ALS score
        assert rows.size == n  # no history in the request: every item, ALS-ordered
        cosine = als / np.linalg.norm(items, axis=1)
        differs += int(np.argsort(-cosine)[:20].tolist() != rows[:20].tolist())
    assert differs > 0  # the metric matters on this log: cosine would rank differently


def test_auto_is_exact_up_to_the_threshold_then_faiss(tmp_path, als_log, monkeypatch):
    n = len(als_log.item_ids)
    assert resolve_backend("auto", EXACT_MAX_ITEMS) == "exact"
    assert resolve_backend("auto", EXACT_MAX_ITEMS + 1) == "faiss"
    assert resolve_backend("annoy", 10) == "annoy"
    monkeypatch.setattr(ann_module, "EXACT_MAX_ITEMS", n)
    root, p = build(tmp_path / "small", als_log, factors=8, iterations=5)
    small = open_source(root, p)
    assert small.backend == "exact" and isinstance(small.index, ExactSearch)
    assert not (root / "ann" / "index.faiss").exists()
    monkeypatch.setattr(ann_module, "EXACT_MAX_ITEMS", n - 1)
    root, p = build(tmp_path / "large", als_log, factors=8, iterations=5, nlist=16)
    large = open_source(root, p)
    assert large.backend == "faiss" and isinstance(large.index, FaissIVF)
    # a backend configured explicitly must match the build
    with pytest.raises(ArtifactError, match="backend"):
        open_source(root, p.model_copy(update={"backend": "exact"}))
    got, _ = large.retrieve(Request(user_id=3), 10, Deadline.in_ms(1000))
    assert got.size == 10


def test_faiss_calibration_uses_serving_metric_and_queries(tmp_path, als_log, monkeypatch):
    """ALS + faiss: the index ranks by inner product like serving, and nprobe is calibrated on
    the vectors serving builds (re-solved from each sampled user's recent items)."""
    monkeypatch.setattr(ann_module, "_CALIBRATION_K", 20)  # k = 1,000 would be every item here
    root, p = build(tmp_path, als_log, factors=8, iterations=10, backend="faiss", nlist=16)
    meta = json.loads((root / "ann" / "ann.json").read_text())
    source = open_source(root, p)
    assert isinstance(source.index, FaissIVF)
    items = np.load(root / "ann" / "item_factors.npy")
    # dot is searched as L2 over rows lifted to the longest row's norm (ann_faiss.lifted)
    assert meta["metric"] == "dot" and source.index.lift is not None
    assert source.index.lift == pytest.approx(np.linalg.norm(items, axis=1).max(), rel=1e-5)
    gram = np.load(root / "ann" / "gram.npy")
    queries = ann_module._calibration_queries(als_log, items, None, None, gram, p)
    assert queries.shape[0] == meta["nprobe_queries"] == 200
    # each calibration query is what query_vector builds for that user at that event
    serving = []
    for u in range(len(als_log.user_ids)):
        mine = np.flatnonzero(als_log.users == u)
        codes = als_log.items[mine]
        ids = als_log.item_ids.to_external(codes)
        for end in range(mine.size):
            h = tuple(ids[max(0, end + 1 - p.history) : end + 1].tolist())
            serving.append(source.query_vector(Request(history=h))[0])
    serving_arr = np.asarray(serving)
    gap = [np.min(np.linalg.norm(serving_arr - q, axis=1)) / np.linalg.norm(q) for q in queries]
    assert max(gap) < 1e-4
    # the recorded recall is inner-product recall at the chosen nprobe
    truth = np.argsort(-(items @ queries.T), axis=0)[:20].T
    hits = [
        np.intersect1d(source.index.search_raw(q, 20, meta["nprobe"])[0], t).size
        for q, t in zip(queries, truth, strict=True)
    ]
    assert abs(np.mean(hits) / 20 - meta["nprobe_recall"]) < 1e-3
    assert meta["nprobe_recall"] >= p.target_recall
    # and the scores it returns are the inner products, back from the lifted distances
    for q in queries[:20]:
        rows, scores = source.index.search(q, 20)
        exact = items[rows] @ q
        assert np.allclose(scores, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
        assert np.all(np.diff(scores) <= 1e-5 * np.abs(exact).max())


def test_bad_request_vectors_skip_on_exact(emb, tmp_path):
    d, _, _ = emb
    log = write_events(tmp_path / "e.csv", [(0, 1, T0)])
    root, p = build(d, log, **emb_params(d, backend="exact"))
    source = open_source(root, p)
    nan = np.ones(DIMS, np.float32)
    nan[2] = np.nan
    with pytest.raises(SkipSource, match="NaN"):
        source.retrieve(Request(vector=nan), 10, Deadline.in_ms(100))
    with pytest.raises(SkipSource, match="dims"):
        source.retrieve(Request(vector=np.ones(DIMS - 1, np.float32)), 10, Deadline.in_ms(100))
    with pytest.raises(SkipSource, match="zero"):
        source.retrieve(Request(vector=np.zeros(DIMS, np.float32)), 10, Deadline.in_ms(100))


def test_damaged_or_missing_item_factors_name_the_file(emb, tmp_path):
    d, x, _ = emb
    log = write_events(tmp_path / "e.csv", [(0, 1, T0)])
    root, p = build(d, log, **emb_params(d, backend="exact"))
    path = root / "ann" / "item_factors.npy"
    good = path.read_bytes()
    name = r"item_factors\.npy"

    path.unlink()
    with pytest.raises(ArtifactError, match=name):
        open_source(root, p)
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ArtifactError, match=name):
        open_source(root, p)
    path.write_bytes(b"not an npy file at all")
    with pytest.raises(ArtifactError, match=name):
        open_source(root, p)
    np.save(path, x[:, :-1])  # other dims than the sidecar's
    with pytest.raises(ArtifactError, match=name):
        open_source(root, p)
    bad = x.copy()
    bad[41, 0] = np.nan
    np.save(path, bad)
    with pytest.raises(ArtifactError, match=name + r".*row 41"):
        open_source(root, p)
    path.write_bytes(good)
    side = root / "ann" / "ann.json"
    meta = json.loads(side.read_text())
    for change in ({"dims": DIMS + 1}, {"n_items": N_ITEMS - 1}, {"format_version": 0}):
        side.write_text(json.dumps({**meta, **change}))
        with pytest.raises(ArtifactError):
            open_source(root, p)
    side.write_text(json.dumps({k: v for k, v in meta.items() if k != "own_ids"}))
    with pytest.raises(ArtifactError, match="own_ids"):
        open_source(root, p)
    side.write_text(json.dumps(meta))
    assert isinstance(open_source(root, p).index, ExactSearch)


@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_history_resolve_is_implicits_recalculate_user(tmp_path, als_log, decay):
    """query_vector's "recalculated" rule equals implicit's own recalculate_user for the same
    item factors and the same per-item weights (repeats summed, recency-decayed)."""
    from implicit.cpu.als import AlternatingLeastSquares

    root, p = build(
        tmp_path, als_log, factors=8, iterations=10, recency_decay=decay, exclude_history=True
    )
    source = open_source(root, p)
    items = np.load(root / "ann" / "item_factors.npy")
    model = AlternatingLeastSquares(
        factors=p.factors, regularization=p.regularization, alpha=p.alpha, random_state=0
    )
    model.item_factors = items
    model.user_factors = np.load(root / "ann" / "user_factors.npy")
    ids = als_log.item_ids.to_external(np.arange(len(als_log.item_ids)))
    for hist in ((ids[3], ids[60], ids[3], ids[7]), (ids[100],), tuple(ids[10:40])):
        req = Request(history=tuple(int(i) for i in hist))
        got, rows, how = source.query_vector(req)
        assert how == "recalculated"
        hist_ids, weights = weighted_history(req, p.history, p.recency_decay, p.event_weights)
        cols = als_log.item_ids.to_dense(hist_ids)
        row = sp.csr_matrix((weights, (np.zeros(cols.size, int), cols)), shape=(1, ids.size))
        want = model.recalculate_user(0, row)
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4 * np.abs(want).max())
        assert sorted(rows.tolist()) == sorted(cols.tolist())


def test_default_params_are_the_documented_ones():
    p = AnnParams()
    assert (p.backend, p.metric, p.alpha, p.factors) == ("auto", None, 40.0, 64)


@pytest.mark.parametrize("metric", ["dot", "angular", "euclidean"])
def test_one_exact_search_batched_by_chunks_answers_as_serving_does(tmp_path, metric):
    """``exact_top_k`` is the one exact search: a batch of queries over a matrix read in chunks
    (the faiss build's recall reference) gives the rows and scores serving's ``ExactSearch``
    gives one query at a time, best first."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1000, 8)).astype(np.float32)
    x[3] = 0.0  # a zero row: cosine 0, never a NaN
    q = rng.normal(size=(6, 8)).astype(np.float32)
    if metric == "angular":
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    rows, scores = exact_top_k(x, q, 40, metric, chunk_rows=97)
    assert rows.shape == scores.shape == (6, 40) and rows.dtype == np.int64
    serving = ExactSearch(x, metric, tmp_path / "item_factors.npy")
    for i, v in enumerate(q):
        one_rows, one_scores = serving.search(v, 40)
        assert rows[i].tolist() == one_rows.tolist()
        assert scores[i] == pytest.approx(one_scores, rel=1e-5, abs=1e-6)
        assert (np.diff(scores[i]) <= 0).all()
    assert exact_top_k(x, q[0], 0, metric)[0].shape == (0,)
    assert exact_top_k(x, q[0], 5000, metric)[0].size == 1000
