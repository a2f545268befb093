"""The shared aggregation behind co-visitation and item-CF."""

import numpy as np
import pytest

from retrieval.artifacts import CSR
from retrieval.types import Deadline
from sources.history import IdGroups, sum_by_id, top_k_order
from sources.neighbours import aggregate, top_k_per_row


def csr_from(rows):
    """rows: {item: [(neighbour, score), ...]} over items 0..n-1."""
    n = max(rows) + 1
    indptr = [0]
    idx, sc = [], []
    for i in range(n):
        for j, s in rows.get(i, []):
            idx.append(j)
            sc.append(s)
        indptr.append(len(idx))
    return CSR(np.array(indptr, np.int64), np.array(idx, np.int32), np.array(sc, np.float32))


CSR_HAND = csr_from({0: [(1, 3.0), (2, 1.0)], 1: [(2, 2.0), (3, 1.0)], 2: [(0, 5.0)], 4: []})


HIST = np.array([0, 1], np.int32)
HIST_W = np.array([1.0, 0.5], np.float32)


def test_weighted_sum_by_hand():
    ids, sc = aggregate(CSR_HAND, HIST, HIST_W, 10)
    # candidates: 1 (3.0 from 0's row: history items stay candidates), 2 (1.0 + 0.5*2 = 2.0),
    # 3 (0.5); 0 is in neither row
    assert ids.tolist() == [1, 2, 3]
    assert sc.tolist() == pytest.approx([3.0, 2.0, 0.5])


def test_self_weight_scores_history_items_by_their_own_rows_top():
    ids, sc = aggregate(CSR_HAND, HIST, HIST_W, 10, self_weight=1.0)
    # 0: 1.0 * 1 * 3.0 (its row's top); 1: 3.0 from 0's row + 0.5 * 1 * 2.0
    assert ids.tolist() == [1, 0, 2, 3]
    assert sc.tolist() == pytest.approx([4.0, 3.0, 2.0, 0.5])
    ids, sc = aggregate(CSR_HAND, HIST, HIST_W, 10, self_weight=0.5)
    assert dict(zip(ids.tolist(), sc.tolist(), strict=True)) == pytest.approx(
        {1: 3.5, 0: 1.5, 2: 2.0, 3: 0.5}
    )


def test_dropped_ids_are_never_returned():
    ids, _ = aggregate(CSR_HAND, HIST, HIST_W, 10, drop=np.array([2, -1], np.int32))
    assert ids.tolist() == [1, 3]


def test_unknown_and_empty_rows():
    ids, _ = aggregate(CSR_HAND, np.array([-1, 4], np.int32), np.ones(2, np.float32), 10)
    assert ids.size == 0


def test_k_and_ties_by_id():
    c = csr_from({0: [(3, 1.0), (2, 1.0), (1, 1.0)]})
    ids, _ = aggregate(c, np.array([0], np.int32), np.ones(1, np.float32), 2)
    assert ids.tolist() == [1, 2]


def test_hurry_reads_fewer_history_items():
    c = csr_from({i: [(100 + i, 1.0)] for i in range(20)} | {120: []})
    w = np.linspace(0.1, 1.0, 20).astype(np.float32)
    rows = np.arange(20, dtype=np.int32)
    full, _ = aggregate(c, rows, w, 50, Deadline.in_ms(1000))
    hurried, _ = aggregate(c, rows, w, 50, Deadline.in_ms(0.0))
    assert full.size == 20 and hurried.size == 5
    assert set(hurried.tolist()) == {115, 116, 117, 118, 119}  # the heaviest history items


def test_top_k_per_row():
    csr = top_k_per_row(
        np.array([0, 0, 0, 2]), np.array([5, 6, 7, 1]), np.array([1.0, 3.0, 3.0, 2.0]), 3, 2
    )
    assert csr.indptr.tolist() == [0, 2, 2, 3]
    assert csr.indices.tolist() == [6, 7, 1]


def test_top_k_per_row_matches_a_lexsort_reference():
    rng = np.random.default_rng(3)
    n = 5000
    rows = rng.integers(0, 50, n)
    cols = rng.integers(0, 400, n)
    # few distinct values: many ties; negatives and zero exercise the float-bit ordering
    vals = rng.choice(np.array([-2.5, -0.5, 0.0, 0.25, 1.0, 3.0, 1e6]), n)
    csr = top_k_per_row(rows, cols, vals, 60, 7)
    order = np.lexsort((cols, -vals, rows))
    r, c, v = rows[order], cols[order], vals[order]
    for i in range(60):
        mine = r == i
        assert csr.row(i)[0].tolist() == c[mine][:7].tolist()
        assert csr.row(i)[1].tolist() == v[mine][:7].astype(np.float32).tolist()
    assert csr.indptr[-1] == csr.nnz and csr.n_rows == 60


def test_the_one_sum_by_id_kernel_counts_or_sorts_to_the_same_bits():
    """``IdGroups``: sorted distinct ids and float64 sums in input order, whether it sorts or
    (ints below ``n_ids``) counts; ``inverse`` maps every input back to its id."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 500, 5000)
    w = rng.random(5000)
    sorted_, counted = IdGroups(ids), IdGroups(ids, n_ids=500)
    assert sorted_._inverse is not None and counted._inverse is None  # both paths taken
    assert np.array_equal(sorted_.ids, counted.ids) and np.array_equal(sorted_.ids, np.unique(ids))
    assert np.array_equal(sorted_.sum(w), counted.sum(w))  # bit for bit
    assert np.array_equal(sorted_.ids[sorted_.inverse], ids)
    assert np.array_equal(counted.ids[counted.inverse], ids)
    expected = {}
    for i, x in zip(ids.tolist(), w.tolist(), strict=True):  # Python's sum, in input order
        expected[i] = expected.get(i, 0.0) + x
    assert sorted_.sum(w).tolist() == [expected[i] for i in sorted_.ids.tolist()]
    uniq, total = sum_by_id(np.array(["b", "a", "b"]), np.array([1.0, 2.0, 3.0]))
    assert uniq.tolist() == ["a", "b"] and total.tolist() == [2.0, 4.0]
    uniq, total = sum_by_id(np.empty(0, np.int64), np.empty(0))
    assert uniq.size == 0 and total.dtype == np.float64


def test_top_k_order_breaks_ties_by_the_smaller_id():
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0])
    ids = np.array([10, 40, 20, 30, 50])
    assert top_k_order(scores, ids, 2).tolist() == [2, 1]  # ids 20, 40 of the three 3.0s
    assert top_k_order(scores, ids, 0).size == 0
    assert top_k_order(scores, ids, 9).tolist() == [2, 1, 4, 3, 0]
