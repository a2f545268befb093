"""Item-CF: neighbours match a direct cosine computation on the same matrix."""

import warnings

import numpy as np
import pytest

from retrieval.offline.events import read_events
from retrieval.testing.contract import SourceContract
from retrieval.types import Deadline, Request
from sources.itemcf import (
    ItemCFParams,
    ItemCFSource,
    blockwise_similarity,
    recent_items_mask,
    user_item_matrix,
    weighted_matrix,
)
from tests.builds import build_source


def random_rows(seed=0, users=40, items=25, n=300):
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n)
    i = rng.integers(0, items, n)
    return [f"{a},{100 + b},{t}" for t, (a, b) in enumerate(zip(u, i, strict=True))]


def test_cosine_neighbours_match_numpy(tmp_path):
    rows = random_rows()
    src = build_source(tmp_path, ItemCFSource, ItemCFParams(neighbours=5), rows)
    events = read_events(tmp_path / "src.csv")
    m = user_item_matrix(events, {}).toarray().astype(np.float64)
    norms = np.linalg.norm(m, axis=0)
    sim = (m.T @ m) / np.outer(norms, norms)
    for item in range(m.shape[1]):
        got_idx, got_sc = src.csr.row(item)
        expected = np.sort(sim[item][sim[item] > 0])[::-1][:5]
        assert np.allclose(np.sort(got_sc)[::-1], expected, atol=1e-5), item
        assert np.allclose(sim[item][got_idx], got_sc, atol=1e-5)
        # the item itself first, with its self-similarity, as in implicit's model
        assert got_idx[0] == item and got_sc[0] == pytest.approx(1.0, abs=1e-5)


def test_history_items_come_back_with_their_summed_score(tmp_path):
    """implicit's recommend without filtering liked items: user_items @ similarity, diagonal
    included, so a history item scores its own weight plus its similarity to the others."""
    src = build_source(
        tmp_path, ItemCFSource, ItemCFParams(neighbours=30, expand_decay=0.0), random_rows()
    )
    events = read_events(tmp_path / "src.csv")
    m = user_item_matrix(events, {}).toarray().astype(np.float64)
    norms = np.linalg.norm(m, axis=0)
    sim = (m.T @ m) / np.outer(norms, norms)  # 25 items: 30 neighbours keep them all
    hist = events.item_ids.to_dense(np.array([100, 101]))
    ids, scores = src.retrieve(Request(history=(100, 101)), 25, Deadline.in_ms(100))
    expected = 0.9 * sim[hist[0]] + 1.0 * sim[hist[1]]  # 101 is the most recent
    got = dict(zip(events.item_ids.to_dense(ids).tolist(), scores.tolist(), strict=True))
    assert got == pytest.approx({i: expected[i] for i in np.flatnonzero(expected > 0)}, abs=1e-5)
    assert {100, 101} <= set(ids.tolist())
    assert got[int(hist[1])] == pytest.approx(1.0 + 0.9 * sim[hist[0], hist[1]], abs=1e-5)


@pytest.mark.parametrize("model", ["bm25", "tfidf"])
def test_other_models_build_and_serve(tmp_path, model):
    src = build_source(
        tmp_path, ItemCFSource, ItemCFParams(model=model, neighbours=5), random_rows()
    )
    ids, scores = src.retrieve(Request(history=(100, 101)), 10, Deadline.in_ms(100))
    assert 0 < ids.size <= 10 and np.unique(ids).size == ids.size
    assert np.all(np.diff(scores) <= 0)


def test_string_ids_round_trip(tmp_path):
    rows = [f"u{r.split(',')[0]},sku-{r.split(',')[1]},{r.split(',')[2]}" for r in random_rows()]
    src = build_source(tmp_path, ItemCFSource, ItemCFParams(neighbours=5), rows)
    ids, _ = src.retrieve(Request(history=("sku-100",)), 5, Deadline.in_ms(100))
    assert ids.dtype.kind == "U" and all(i.startswith("sku-") for i in ids.tolist())


class TestItemCFContract(SourceContract):
    def make_source(self, tmp_path):
        return build_source(tmp_path, ItemCFSource, ItemCFParams(neighbours=10), random_rows(1))

    def known_request(self):
        return Request(user_id=1, history=(100, 101, 102))


@pytest.mark.parametrize("model", ["cosine", "bm25", "tfidf"])
def test_blockwise_equals_implicit(tmp_path, model):
    """Block-wise W^T W gives implicit's own item-item model's neighbours, whatever the blocks."""
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender, TFIDFRecommender

    rng = np.random.default_rng(5)
    rows = [f"{u},{100 + i},{t}" for t, (u, i) in enumerate(rng.integers(0, [60, 80], (900, 2)))]
    build_source(tmp_path, ItemCFSource, ItemCFParams(), rows)  # writes src.csv
    events = read_events(tmp_path / "src.csv")
    matrix = user_item_matrix(events, {})
    cls = {"cosine": CosineRecommender, "bm25": BM25Recommender, "tfidf": TFIDFRecommender}
    reference = cls[model](K=8)  # 8 neighbours, the item itself among them
    with warnings.catch_warnings():  # implicit warns about the COO matrix its own normalize makes
        warnings.filterwarnings("ignore", message="Method expects CSR input")
        reference.fit(matrix, show_progress=False)
    ref = reference.similarity.toarray()
    assert np.count_nonzero(np.diag(ref)) > 0  # implicit keeps the self-similarity
    w = weighted_matrix(matrix, model)
    for block_items in (1, 7, 10**6):  # one item per block, uneven blocks, one block
        csr = blockwise_similarity(w, 8, block_items=block_items)
        for item in range(w.shape[1]):
            got_i, got_s = csr.row(item)
            ref_s = np.sort(ref[item][ref[item] > 0])[::-1][:8]
            np.testing.assert_allclose(got_s, ref_s, rtol=1e-5, atol=1e-6)
            # same items, except where float rounding reorders (near-)equal scores
            cut = ref_s[-1] + 1e-5 if ref_s.size else 0.0
            ref_i = set(np.flatnonzero(ref[item] > cut).tolist())
            assert set(got_i[got_s > cut].tolist()) == ref_i


def test_heavy_users_count_only_their_most_recent_items(tmp_path):
    # user "a": items 100..109 in time order, then 100 again (so 100 is among its latest);
    # user "b": two items only, under the cap.
    rows = [f"a,{100 + i},{t}" for t, i in enumerate(range(10))] + ["a,100,50", "a,109,51"]
    rows += ["b,105,60", "b,106,61"]
    src = build_source(tmp_path, ItemCFSource, ItemCFParams(max_user_items=3), rows)
    events = read_events(tmp_path / "src.csv")
    mask = recent_items_mask(events, 3)
    users = events.user_ids.to_external(events.users[mask]).tolist()
    items = events.item_ids.to_external(events.items[mask]).tolist()
    kept = {(str(u), str(i)) for u, i in zip(users, items, strict=True)}
    assert kept == {("a", "100"), ("a", "109"), ("a", "108"), ("b", "105"), ("b", "106")}
    assert int(mask.sum()) == 7  # both events on 100 and on 109 count, as uncapped
    capped = user_item_matrix(events, {}, max_user_items=3)
    assert capped.getnnz() == 5
    # Item 101 was only touched by "a", long ago: it no longer has neighbours (not even
    # itself); 100 has two besides itself.
    dense = events.item_ids.to_dense(np.array([101, 100]))
    assert src.csr.row(int(dense[0]))[0].size == 0
    neighbours = events.item_ids.to_external(src.csr.row(int(dense[1]))[0]).tolist()
    assert sorted(neighbours) == [100, 108, 109]
    uncapped = ItemCFParams(max_user_items=None)
    (tmp_path / "full").mkdir()
    full = build_source(tmp_path / "full", ItemCFSource, uncapped, rows)
    assert full.csr.row(int(dense[0]))[0].size == 10  # 9 others and itself
