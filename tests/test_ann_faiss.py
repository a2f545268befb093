"""ANN with the faiss backend: exact when every list is probed, validated sidecar, contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.artifacts import ArtifactError
from retrieval.testing.contract import SourceContract
from retrieval.types import Deadline, Request
from sources.ann import AnnSource
from sources.ann_exact import exact_top_k
from sources.ann_faiss import default_nlist, default_nprobe
from tests.test_ann import DIMS, N_ITEMS, T0, build, open_source, write_events

pytest.importorskip("faiss")


@pytest.fixture
def log(tmp_path):
    rows = [(u, (u * 7 + j) % 30, T0 + j) for u in range(30) for j in range(5)]
    return write_events(tmp_path / "events.csv", rows)


@pytest.fixture
def emb(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(N_ITEMS, DIMS)).astype(np.float32)
    ids = np.arange(500, 500 + N_ITEMS)[rng.permutation(N_ITEMS)]
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "emb_ids.npy", ids)
    return tmp_path, x, ids


def faiss_params(d: Path, **extra: Any) -> dict[str, Any]:
    return {
        "embeddings": str(d / "emb.npy"),
        "embedding_ids": str(d / "emb_ids.npy"),
        "backend": "faiss",
        "nlist": 8,
        "nprobe": 8,  # = nlist: every list is scanned, the search is exact
        **extra,
    }


class TestFaissContract(SourceContract):
    def make_source(self, tmp_path):
        rows = [(u, (u * 7 + j) % 30, T0 + j) for u in range(30) for j in range(5)]
        events = write_events(tmp_path / "e.csv", rows)
        root, p = build(tmp_path, events, factors=4, iterations=3, backend="faiss", nlist=4)
        return open_source(root, p)

    def known_request(self):
        return Request(user_id=3)


@pytest.mark.parametrize(
    ("metric", "storage"),
    [("angular", "flat"), ("dot", "flat"), ("euclidean", "flat"), ("angular", "sq8")],
)
def test_all_lists_probed_is_exact_search(emb, log, metric, storage):
    d, x, ids = emb
    root, p = build(d, log, **faiss_params(d, metric=metric, storage=storage))
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


def test_sidecar_mismatch_is_a_clear_error(emb, log):
    d, _, _ = emb
    root, p = build(d, log, **faiss_params(d))
    side = root / "ann" / "ann.json"
    meta = json.loads(side.read_text())
    for change, pattern in (
        ({"dims": DIMS * 2}, r"expected \(120, 16\)"),
        ({"n_items": N_ITEMS + 1}, r"121"),
        ({"nlist": 99}, "nlist"),
        ({"index_bytes": 12}, "bytes"),
        ({"nlist": None}, "nlist"),
    ):
        side.write_text(json.dumps({**meta, **change}))
        with pytest.raises(ArtifactError, match=pattern):
            open_source(root, p)
    side.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="backend"):
        open_source(root, p.model_copy(update={"backend": "annoy"}))
    (root / "ann" / "index.faiss").write_bytes(b"x" * meta["index_bytes"])
    with pytest.raises(ArtifactError, match="faiss cannot read"):
        open_source(root, p)


def test_tight_deadline_lowers_nprobe(emb, log):
    d, _, _ = emb
    root, p = build(d, log, **faiss_params(d))
    source = open_source(root, p)
    assert source.index.nprobe(10, Deadline.in_ms(1000)) == 8
    assert source.index.nprobe(10, Deadline.in_ms(0.5)) < 8
    got, _ = source.retrieve(Request(vector=np.ones(DIMS)), 10, Deadline.in_ms(0.01))
    assert 0 < got.size <= 10


def zipf_clusters(n: int = 20_000) -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(140, 16))
    p = 1.0 / np.arange(1, 141) ** 0.7
    return centres[rng.choice(140, size=n, p=p / p.sum())] + 0.6 * rng.normal(size=(n, 16))


def test_balanced_lists_cut_the_largest_list(tmp_path, log):
    """Zipf-sized clusters: plain k-means leaves the big ones a few lists of 3x the mean."""
    x = zipf_clusters()
    np.save(tmp_path / "emb.npy", x.astype(np.float32))
    np.save(tmp_path / "emb_ids.npy", np.arange(x.shape[0]))
    stats = {}
    for balance in (False, True):
        params = faiss_params(tmp_path, nlist=64, balance_lists=balance)
        root, built = build(tmp_path, log, **params)
        stats[balance] = json.loads((root / "ann" / "ann.json").read_text())
        assert isinstance(open_source(root, built), AnnSource)
    assert stats[True]["list_size_max"] < 0.8 * stats[False]["list_size_max"]


def test_defaults_grow_with_the_catalogue():
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(10) == 1
    assert default_nprobe(4000, 1_000_000) == 160  # 40 x k = 40,000 vectors of 250 per list
    assert default_nprobe(8, 100) == 8


@pytest.mark.parametrize("l2", [False, True])
def test_exact_top_k_by_chunks_matches_a_full_sort(l2):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, 8)).astype(np.float32)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    got, scores = exact_top_k(x, q, 50, "euclidean" if l2 else "dot", chunk_rows=64)
    for row, row_scores, qq in zip(got, scores, q, strict=True):
        score = -np.linalg.norm(x - qq, axis=1) if l2 else x @ qq
        assert set(row.tolist()) == set(np.argsort(-score)[:50].tolist())
        assert row_scores == pytest.approx(score[row], rel=1e-4, abs=1e-4)  # best first
        assert (np.diff(row_scores) <= 0).all()


def test_nprobe_is_calibrated_at_build_to_the_target_recall(tmp_path, log):
    """The build keeps the smallest doubling of nprobe whose recall@1000 (for users sampled
    from the log, against exact search) reaches target_recall; serving then uses it."""
    from sources.ann import _calibration_queries

    x = zipf_clusters().astype(np.float32)
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "emb_ids.npy", np.arange(x.shape[0]))
    chosen = {}
    for target in (0.5, 0.97):
        params = {**faiss_params(tmp_path, nlist=64), "nprobe": None, "target_recall": target}
        root, built = build(tmp_path, log, **params)
        meta = json.loads((root / "ann" / "ann.json").read_text())
        nprobe, tried = meta["nprobe"], meta["nprobe_tried"]
        assert meta["nprobe_recall"] >= target
        if nprobe > 1:  # the one before it in the doubling fell short
            assert tried[str(nprobe // 2)] < target
        source = open_source(root, built)
        assert source.index.nprobe(1000, Deadline.in_ms(1000)) == nprobe
        assert source.index.nprobe(2000, Deadline.in_ms(1000)) == min(meta["nlist"], 2 * nprobe)
        # The recorded recall is what the index gives for those queries: recompute it here.
        q = _calibration_queries(log, x, source.item_ids, None, None, built)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        truth = np.argsort(-(x / np.linalg.norm(x, axis=1, keepdims=True)) @ q.T, axis=0)[:1000]
        hits = [
            np.intersect1d(source.index.search_raw(v, 1000, nprobe)[0], truth[:, j]).size
            for j, v in enumerate(q)
        ]
        assert abs(np.mean(hits) / 1000 - meta["nprobe_recall"]) < 1e-3
        chosen[target] = nprobe
    assert chosen[0.5] < chosen[0.97]


_CORES = """
import json, numpy
from threadpoolctl import threadpool_info
from sources.ann_faiss import require_faiss

def cores():
    return {p["filepath"]: p.get("architecture") for p in threadpool_info()
            if p.get("internal_api") == "openblas"}

before = cores()
require_faiss()
print(json.dumps({"before": before, "after": cores()}))
"""


def _openblas_cores(**env: str) -> tuple[dict[str, str], dict[str, str]]:
    """The OpenBLAS libraries loaded (path: core) before faiss and after it, in a fresh
    interpreter (the core type is read once, when a library loads)."""
    import os
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    out = subprocess.run(
        [sys.executable, "-c", _CORES], env={**clean, **env}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    return result["before"], result["after"]


def _faiss_cores(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [core for path, core in after.items() if path not in before]


def test_faiss_blas_runs_the_core_numpy_detected():
    """faiss-cpu bundles an older OpenBLAS, which took its generic kernels on a VM that hides
    the CPU model (2.4x slower builds): it must run the core numpy's OpenBLAS found."""
    from sources.ann_faiss import _KNOWN_CORES

    before, after = _openblas_cores()
    mapped = [_KNOWN_CORES.get(str(c).lower()) for c in before.values()]
    if not mapped or mapped[0] is None:
        pytest.skip(f"numpy's BLAS cores {before} are not ones the table maps")
    faiss_cores = _faiss_cores(before, after)
    if not faiss_cores:
        pytest.skip("this faiss build does not bundle its own OpenBLAS")
    assert faiss_cores == [mapped[0]] * len(faiss_cores), (before, after)


def test_a_core_type_the_user_set_is_kept():
    before, after = _openblas_cores(OPENBLAS_CORETYPE="Haswell")
    faiss_cores = _faiss_cores(before, after)
    if not faiss_cores:
        pytest.skip("this faiss build does not bundle its own OpenBLAS")
    assert faiss_cores == ["Haswell"] * len(faiss_cores), (before, after)
