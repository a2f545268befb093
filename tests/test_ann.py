"""ANN: exact on small sets, ALS and user-supplied embeddings, validated sidecar and inputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.artifacts import ArtifactError
from retrieval.offline.events import EventLog, read_events
from retrieval.testing.contract import SourceContract
from retrieval.types import Deadline, Request
from sources.ann import AnnParams, AnnSource
from sources.base import SkipSource, SourceContext

T0 = 1_700_000_000.0
N_ITEMS, DIMS = 120, 8


def write_events(path: Path, rows: list[tuple[Any, ...]]) -> EventLog:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(rows)
    return read_events(path)


def build(tmp_path: Path, events: EventLog, **params: Any) -> tuple[Path, AnnParams]:
    root = tmp_path / "build"
    (root / "ids").mkdir(parents=True, exist_ok=True)
    events.item_ids.save(root / "ids" / "items.npy")
    events.user_ids.save(root / "ids" / "users.npy")
    p = AnnParams.model_validate(params)
    AnnSource.build(events, root / "ann", p)
    return root, p


def open_source(root: Path, p: AnnParams) -> AnnSource:
    return AnnSource("ann", p, SourceContext(artifacts=root))


@pytest.fixture
def clustered_log(tmp_path) -> EventLog:
    """Users 0-19 click items 0-9, users 20-39 click items 10-19 (a clear two-block structure)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        base = 0 if u < 20 else 10
        for j, item in enumerate(rng.choice(10, size=6, replace=False) + base):
            rows.append((u, int(item), T0 + j))
    return write_events(tmp_path / "events.csv", rows)


@pytest.fixture
def embedded(tmp_path, clustered_log) -> tuple[Path, np.ndarray, np.ndarray]:
    """A random embedding matrix for string ids in shuffled row order."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N_ITEMS, DIMS)).astype(np.float32)
    ids = np.array([f"sku-{i:03d}" for i in rng.permutation(N_ITEMS)])
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "emb_ids.npy", ids)
    return tmp_path, x, ids


def emb_params(d: Path, **extra: Any) -> dict[str, Any]:
    return {
        "embeddings": str(d / "emb.npy"),
        "embedding_ids": str(d / "emb_ids.npy"),
        "backend": "annoy",
        "n_trees": 20,
        "search_k": 100_000,  # more than the whole index: the search is exhaustive
        **extra,
    }


class TestAnnContract(SourceContract):
    def make_source(self, tmp_path):
        rows = [(u, (u * 7 + j) % 30, T0 + j) for u in range(30) for j in range(5)]
        events = write_events(tmp_path / "e.csv", rows)
        root, p = build(tmp_path, events, factors=4, iterations=3, n_trees=5)
        return open_source(root, p)

    def known_request(self):
        return Request(user_id=3)


@pytest.mark.parametrize("metric", ["angular", "dot", "euclidean"])
def test_exact_nearest_items_match_brute_force(embedded, clustered_log, metric):
    d, x, ids = embedded
    root, p = build(d, clustered_log, **emb_params(d, metric=metric))
    source = open_source(root, p)
    q = np.random.default_rng(2).normal(size=DIMS).astype(np.float32)
    got, scores = source.retrieve(Request(vector=q), 10, Deadline.in_ms(1000))
    if metric == "angular":
        truth = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    elif metric == "dot":
        truth = x @ q
    else:
        truth = -np.linalg.norm(x - q, axis=1)
    best = np.argsort(-truth)[:10]
    assert got.tolist() == ids[best].tolist()
    np.testing.assert_allclose(scores, truth[best], rtol=1e-3, atol=1e-3)
    vec = source.item_vectors()[source.item_index().to_dense(ids[:1])[0]]
    np.testing.assert_array_equal(vec, x[0])  # item_vectors() is in index order


def test_history_excluded_and_mean_of_history_for_given_embeddings(embedded, clustered_log):
    d, _, ids = embedded
    root, p = build(d, clustered_log, **emb_params(d, exclude_history=True))
    source = open_source(root, p)
    hist = (str(ids[5]), str(ids[7]))
    got, _ = source.retrieve(Request(history=hist), 10, Deadline.in_ms(1000))
    assert got.size == 10 and not set(hist) & set(got.tolist())
    _, excluded, how = source.query_vector(Request(history=hist))
    assert how == "history_mean" and excluded.size == 2
    with pytest.raises(SkipSource, match="no query vector"):
        source.retrieve(Request(user_id=3, history=("unknown",)), 10, Deadline.in_ms(1000))


def test_bad_request_vectors_skip(embedded, clustered_log):
    d, _, _ = embedded
    root, p = build(d, clustered_log, **emb_params(d))
    source = open_source(root, p)
    nan = np.full(DIMS, np.nan, dtype=np.float32)
    with pytest.raises(SkipSource, match="NaN"):
        source.retrieve(Request(vector=nan), 10, Deadline.in_ms(100))
    with pytest.raises(SkipSource, match="dims"):
        source.retrieve(Request(vector=np.ones(DIMS + 1, np.float32)), 10, Deadline.in_ms(100))


def test_bad_embedding_files_are_build_errors_naming_the_file(tmp_path, clustered_log):
    x = np.ones((N_ITEMS, DIMS), dtype=np.float32)
    x[17, 3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    np.save(tmp_path / "ids.npy", np.arange(N_ITEMS))
    np.save(tmp_path / "short_ids.npy", np.arange(N_ITEMS - 1))
    np.save(tmp_path / "ok.npy", np.ones((N_ITEMS, DIMS), dtype=np.float32))
    np.save(tmp_path / "flat.npy", np.ones(N_ITEMS, dtype=np.float32))
    cases = [
        ("nan.npy", "ids.npy", r"nan\.npy.*row 17"),
        ("ok.npy", "short_ids.npy", r"short_ids\.npy"),
        ("flat.npy", "ids.npy", r"flat\.npy.*2-D"),
        ("ok.npy", None, r"ok\.npy.*120 rows"),
        ("missing.npy", "ids.npy", r"missing\.npy"),
    ]
    for emb, ids, pattern in cases:
        params = {"embeddings": str(tmp_path / emb)}
        if ids:
            params["embedding_ids"] = str(tmp_path / ids)
        with pytest.raises(ValueError, match=pattern):
            build(tmp_path, clustered_log, **params)


def test_damaged_or_mismatched_artifacts_raise_not_crash(embedded, clustered_log):
    d, _, _ = embedded
    root, p = build(d, clustered_log, **emb_params(d))
    ann = root / "ann"
    pristine = d / "pristine"
    shutil.copytree(ann, pristine)

    def restore() -> None:
        shutil.rmtree(ann)
        shutil.copytree(pristine, ann)

    meta = json.loads((ann / "ann.json").read_text())
    for change in ({"dims": DIMS * 2}, {"dims": 0}, {"n_items": 10**6}, {"format_version": 99}):
        (ann / "ann.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(ArtifactError):
            open_source(root, p)
    (ann / "ann.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="sidecar"):
        open_source(root, p)
    restore()
    with (ann / "index.ann").open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(ArtifactError, match="inconsistent"):
        open_source(root, p)
    restore()
    (ann / "index.ann").write_bytes(b"")
    with pytest.raises(ArtifactError):
        open_source(root, p)
    restore()
    np.save(ann / "item_factors.npy", np.zeros((N_ITEMS, DIMS), np.float32) + 3)
    with pytest.raises(ArtifactError, match="self-check"):
        open_source(root, p)
    restore()
    ids, _ = open_source(root, p).retrieve(Request(vector=np.ones(DIMS)), 3, Deadline.in_ms(50))
    assert ids.size == 3


def test_als_serves_known_users_and_history_only_users(tmp_path, clustered_log):
    # 4 factors for a two-block log of 20 items: with 8 and the default alpha (40) ALS fits each
    # user's exact items and a 3-item re-solve picks up that noise (2 of 5 from the other block)
    root, p = build(tmp_path, clustered_log, factors=4, iterations=10, exclude_history=True)
    source = open_source(root, p)

    _, _, how = source.query_vector(Request(user_id=3))
    assert how == "user_factors"
    got, _ = source.retrieve(Request(user_id=3), 5, Deadline.in_ms(1000))
    assert got.size == 5 and np.mean(got < 10) >= 0.8  # user 3 lives in the 0-9 block

    hist = (11, 12, 13)
    req = Request(user_id="new-user", history=hist, history_timestamps=(T0, T0, T0))
    _, _, how = source.query_vector(req)
    assert how == "recalculated"
    got, _ = source.retrieve(req, 5, Deadline.in_ms(1000))
    assert got.size == 5 and not set(hist) & set(got.tolist())
    assert np.mean((got >= 10) & (got < 20)) >= 0.8

    # by default known history wins; with user_vector="trained" only history newer than the build
    stale = Request(user_id=3, history=(1,), history_timestamps=(T0,))
    fresh = Request(user_id=3, history=(1,), history_timestamps=(T0 + 10**6,))
    assert source.query_vector(stale)[2] == "recalculated"
    trained = open_source(root, p.model_copy(update={"user_vector": "trained"}))
    assert trained.query_vector(stale)[2] == "user_factors"
    assert trained.query_vector(fresh)[2] == "recalculated"
    assert trained.query_vector(Request(user_id=3, history=(1,)))[2] == "recalculated"

    with pytest.raises(SkipSource, match="no query vector"):
        source.retrieve(Request(user_id="who"), 5, Deadline.in_ms(1000))


def test_recalculation_matches_the_trained_user_factors(tmp_path, clustered_log):
    """The closed form is implicit's user step: on a user's full history it reproduces X[u]."""
    root, p = build(tmp_path, clustered_log, factors=8, iterations=15, n_trees=5)
    source = open_source(root, p)
    u = 25
    items = clustered_log.items[clustered_log.users == u]
    ids = clustered_log.item_ids.to_external(items)
    req = Request(history=tuple(ids.tolist()), history_timestamps=(T0 + 10**6,) * len(ids))
    # all weights 1: no recency decay for this comparison
    flat = AnnSource("ann", p.model_copy(update={"recency_decay": 1.0}), source.context)
    x, _, how = flat.query_vector(req)
    trained = np.load(root / "ann" / "user_factors.npy")[u]
    assert how == "recalculated"
    cos = x @ trained / (np.linalg.norm(x) * np.linalg.norm(trained))
    assert cos > 0.99


def test_tight_deadline_still_answers(embedded, clustered_log):
    d, _, _ = embedded
    root, p = build(d, clustered_log, **emb_params(d, search_k=-1))
    source = open_source(root, p)
    q = np.ones(DIMS, np.float32)
    got, _ = source.retrieve(Request(vector=q), 10, Deadline.in_ms(0.01))
    assert 0 < got.size <= 10


def test_on_disk_build_and_string_ids(embedded, clustered_log):
    d, x, ids = embedded
    root, p = build(d, clustered_log, **emb_params(d, on_disk_build=True))
    source = open_source(root, p)
    got, _ = source.retrieve(Request(vector=x[3]), 5, Deadline.in_ms(1000))
    assert got.dtype.kind == "U" and got[0] == ids[3]
