"""Each merge strategy against small hand-computed results."""

import numpy as np
import pytest

from blender.merge import SourceList, merge


def sl(ids, scores=None, weight=1.0, quota=None):
    ids = np.asarray(ids, dtype=np.int64)
    if scores is None:
        scores = np.linspace(1, 0.5, ids.size)
    return SourceList(
        ids,
        np.asarray(scores, dtype=np.float32),
        np.arange(ids.size, dtype=np.int32),
        weight,
        quota,
    )


def test_rrf_hand_computed():
    a = sl([1, 2, 3])
    b = sl([3, 4], weight=2.0)
    m = merge([a, b], k=10, strategy="rrf", rrf_k=0)
    # 1: 1/1; 2: 1/2; 3: 1/3 + 2/1; 4: 2/2
    expected = {1: 1.0, 2: 0.5, 3: 1 / 3 + 2.0, 4: 1.0}
    assert m.item_ids.tolist() == [3, 1, 4, 2]  # 1 and 4 tie at 1.0: smaller id first
    assert m.scores.tolist() == pytest.approx([expected[i] for i in [3, 1, 4, 2]])
    # provenance: item 3 was rank 2 in a and rank 0 in b
    assert m.ranks[0].tolist() == [2, 0]
    assert m.ranks[1].tolist() == [0, -1]
    assert m.ranks[2].tolist() == [-1, 1]


def test_score_fusion_normalises_per_source():
    a = sl([1, 2, 3], scores=[10.0, 5.0, 0.0])  # -> 1, .5, 0
    b = sl([2, 4], scores=[0.3, 0.1], weight=0.5)  # -> 1, 0 times .5
    m = merge([a, b], k=2, strategy="score", rrf_k=60)
    # 1: 1.0; 2: .5 + .5 = 1.0; 3: 0; 4: 0 -> tie 1 and 2 broken by id, cut to 2
    assert m.item_ids.tolist() == [1, 2]
    assert m.scores.tolist() == pytest.approx([1.0, 1.0])


def test_quota_interleaves_by_priority_and_dedupes():
    a = sl([1, 2, 3, 4], quota=2)
    b = sl([2, 5, 6, 7], quota=2)
    m = merge([a, b], k=4, strategy="quota", rrf_k=60)
    # a takes 1,2; b skips 2 (taken) and takes 5,6; order interleaves by position then priority
    assert m.item_ids.tolist() == [1, 5, 2, 6]
    # item 2 keeps provenance from both
    row = m.item_ids.tolist().index(2)
    assert m.ranks[row].tolist() == [1, 0]


def test_quota_redistributes_unused_slots():
    a = sl([1], quota=3)  # can fill only 1 of 3
    b = sl([10, 11, 12, 13, 14], quota=2)
    c = sl([20, 21, 22], quota=1)
    m = merge([a, b, c], k=6, strategy="quota", rrf_k=60)
    # quota picks: a:[1], b:[10,11], c:[20] -> 4; 2 spare slots go round-robin over leftovers:
    # b's next (12) then c's next (21)
    assert m.item_ids[:4].tolist() == [1, 10, 20, 11]
    assert m.item_ids[4:].tolist() == [12, 21]


def test_quota_without_explicit_quotas_shares_k():
    a = sl(range(100, 110))
    b = sl(range(200, 210))
    m = merge([a, b], k=6, strategy="quota", rrf_k=60)
    assert sorted(m.item_ids.tolist()) == [100, 101, 102, 200, 201, 202]


def test_missing_sources_and_empty():
    m = merge([None, None], k=5, strategy="rrf", rrf_k=60)
    assert m.item_ids.size == 0 and m.ranks.shape == (0, 2)


def test_string_and_int_ids_unify():
    a = SourceList(np.array(["x", "y"]), np.ones(2, np.float32), np.arange(2, dtype=np.int32))
    b = sl([7])
    m = merge([a, b], k=5, strategy="rrf", rrf_k=0)
    assert set(m.item_ids.tolist()) == {"x", "y", "7"}
