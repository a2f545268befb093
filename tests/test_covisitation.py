"""Co-visitation on tiny logs whose counts are known by hand."""

import numpy as np
import pytest

from retrieval.offline.events import read_events
from retrieval.testing.contract import SourceContract
from retrieval.types import Deadline, Request
from sources.base import SourceContext
from sources.covisitation import CovisitationParams, CovisitationSource, build_covisitation
from tests.builds import build_source


def log(tmp_path, rows, header="user_id,item_id,timestamp", name="log.csv"):
    p = tmp_path / name
    p.write_text(header + "\n" + "\n".join(rows) + "\n")
    return read_events(p)


def neighbours(csr, events, item):
    d = int(events.item_ids.to_dense([item])[0])
    idx, sc = csr.row(d)
    return dict(zip(events.item_ids.to_external(idx).tolist(), sc.tolist(), strict=True))


def test_window_counts(tmp_path):
    # one session a b c d: window 1 links neighbours only, window 2 also skips one
    ev = log(tmp_path, ["1,10,0", "1,11,1", "1,12,2", "1,13,3"])
    csr, _ = build_covisitation(ev, CovisitationParams(window=1), tmp_path / "s")
    assert neighbours(csr, ev, 11) == {10: 1.0, 12: 1.0}
    p = CovisitationParams(window=2, distance_weight="constant")
    csr, _ = build_covisitation(ev, p, tmp_path / "s")
    assert neighbours(csr, ev, 10) == {11: 1.0, 12: 1.0}
    assert neighbours(csr, ev, 11) == {10: 1.0, 12: 1.0, 13: 1.0}


def test_inverse_distance_weights_a_pair_by_one_over_its_distance(tmp_path):
    # one session a b c d e, window 3: a pair d events apart weighs 1/d (the default)
    ev = log(tmp_path, ["1,10,0", "1,11,1", "1,12,2", "1,13,3", "1,14,4"])
    csr, _ = build_covisitation(ev, CovisitationParams(window=3), tmp_path / "s")
    assert neighbours(csr, ev, 10) == pytest.approx({11: 1.0, 12: 1 / 2, 13: 1 / 3})
    assert neighbours(csr, ev, 12) == pytest.approx({10: 1 / 2, 11: 1.0, 13: 1.0, 14: 1 / 2})
    # a pair seen at two distances adds both weights: 10 _ 11 and 10 11
    ev = log(tmp_path, ["1,10,0", "1,12,1", "1,11,2", "2,10,3", "2,11,4"], name="two.csv")
    csr, _ = build_covisitation(ev, CovisitationParams(window=2), tmp_path / "s")
    assert neighbours(csr, ev, 10) == pytest.approx({11: 1 / 2 + 1.0, 12: 1.0})
    p = CovisitationParams(window=2, distance_weight="constant")
    csr, _ = build_covisitation(ev, p, tmp_path / "s")
    assert neighbours(csr, ev, 10) == pytest.approx({11: 2.0, 12: 1.0})


def test_repeated_pairs_add_up_and_rank(tmp_path):
    ev = log(
        tmp_path,
        ["1,10,0", "1,11,1", "2,10,0", "2,11,1", "3,10,0", "3,12,1"],
    )
    csr, _ = build_covisitation(ev, CovisitationParams(window=1), tmp_path / "s")
    nb = neighbours(csr, ev, 10)
    assert nb == {11: 2.0, 12: 1.0}
    d = int(ev.item_ids.to_dense([10])[0])
    assert ev.item_ids.to_external(csr.row(d)[0]).tolist() == [11, 12]  # sorted by score


def test_session_gap_splits_sessions(tmp_path):
    ev = log(tmp_path, ["1,10,0", "1,11,100", "1,12,5000"])
    csr, _ = build_covisitation(
        ev, CovisitationParams(window=5, session_gap_s=1800), tmp_path / "s"
    )
    assert neighbours(csr, ev, 11) == {10: 1.0}
    csr, _ = build_covisitation(
        ev, CovisitationParams(window=5, session_gap_s=6000), tmp_path / "s"
    )
    assert neighbours(csr, ev, 11) == {10: 1.0, 12: 1.0}


def test_session_id_column_wins_over_gaps(tmp_path):
    ev = log(
        tmp_path,
        ["1,10,0,a", "1,11,9000,a", "1,12,9001,b"],
        header="user_id,item_id,timestamp,session_id",
    )
    csr, _ = build_covisitation(ev, CovisitationParams(window=5), tmp_path / "s")
    assert neighbours(csr, ev, 10) == {11: 1.0}
    assert neighbours(csr, ev, 12) == {}


def test_event_weights_use_the_target_event(tmp_path):
    ev = log(
        tmp_path,
        ["1,10,0,click", "1,11,1,cart"],
        header="user_id,item_id,timestamp,event_type",
    )
    p = CovisitationParams(window=1, event_weights={"click": 1.0, "cart": 3.0})
    csr, _ = build_covisitation(ev, p, tmp_path / "s")
    assert neighbours(csr, ev, 10) == {11: 3.0}  # 10 -> 11: 11 was carted
    assert neighbours(csr, ev, 11) == {10: 1.0}  # 11 -> 10: 10 was only clicked


def test_forward_direction(tmp_path):
    ev = log(tmp_path, ["1,10,0", "1,11,1"])
    csr, _ = build_covisitation(
        ev, CovisitationParams(window=1, direction="forward"), tmp_path / "s"
    )
    assert neighbours(csr, ev, 10) == {11: 1.0}
    assert neighbours(csr, ev, 11) == {}


def test_time_decay_prefers_recent_pairs(tmp_path):
    day = 86_400
    ev = log(tmp_path, ["1,10,0", "1,11,1", f"2,10,{30 * day}", f"2,12,{30 * day + 1}"])
    csr, _ = build_covisitation(ev, CovisitationParams(window=1), tmp_path / "s")
    assert neighbours(csr, ev, 10) == {11: 1.0, 12: 1.0}
    p = CovisitationParams(window=1, time_decay_half_life_days=10)
    csr, _ = build_covisitation(ev, p, tmp_path / "s")
    nb = neighbours(csr, ev, 10)
    assert nb[12] == pytest.approx(1.0) and nb[11] == pytest.approx(0.125, rel=1e-3)


def test_top_k_truncates(tmp_path):
    ev = log(tmp_path, ["1,10,0", "1,11,1", "1,12,2", "1,13,3", "2,10,0", "2,11,1"])
    csr, _ = build_covisitation(ev, CovisitationParams(window=3, top_k=1), tmp_path / "s")
    assert neighbours(csr, ev, 10) == {11: 2.0}


def test_self_pairs_are_not_counted(tmp_path):
    ev = log(tmp_path, ["1,10,0", "1,10,1", "1,11,2"])
    p = CovisitationParams(window=2, distance_weight="constant")
    csr, _ = build_covisitation(ev, p, tmp_path / "s")
    assert neighbours(csr, ev, 10) == {11: 2.0}


def test_top_k_none_keeps_every_neighbour(tmp_path):
    ev = log(tmp_path, [f"1,{10 + i},{i}" for i in range(8)])
    csr, _ = build_covisitation(ev, CovisitationParams(window=7, top_k=None), tmp_path / "s")
    assert len(neighbours(csr, ev, 10)) == 7
    csr, _ = build_covisitation(ev, CovisitationParams(window=7, top_k=3), tmp_path / "s")
    assert neighbours(csr, ev, 10) == pytest.approx({11: 1.0, 12: 1 / 2, 13: 1 / 3})


def test_chunked_and_partitioned_build_equals_one_pass(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        t = 0
        for _ in range(rng.integers(3, 12)):
            t += int(rng.integers(1, 3000))
            rows.append(f"{u},{int(rng.integers(0, 40))},{t}")
    ev = log(tmp_path, rows)
    one, _ = build_covisitation(ev, CovisitationParams(window=3), tmp_path / "a")
    import sources.covisitation as cov

    monkeypatch.setattr(cov, "_PAIRS_PER_PARTITION", 50)  # forces several partitions
    many, stats = build_covisitation(
        ev, CovisitationParams(window=3, chunk_events=17), tmp_path / "b"
    )
    assert stats["chunks"] > 3 and stats["partitions"] > 3
    assert np.array_equal(one.indptr, many.indptr)
    assert np.array_equal(one.indices, many.indices)
    assert np.allclose(one.scores, many.scores)
    assert not (tmp_path / "b").exists()  # spill files are cleaned up


def test_retrieve_sums_neighbours_and_keeps_history_items(tmp_path):
    # sessions 10 11 and 10 12: 10's row {11: 1, 12: 1}, 11's {10: 1}, 12's {10: 1}
    ev_rows = ["1,10,0", "1,11,1", "2,10,0", "2,12,1"]
    p = CovisitationParams(window=1, self_weight=0.0, expand_decay=0.0)
    src = build_source(tmp_path, CovisitationSource, p, ev_rows)
    # history 10 (older, weight 0.9) then 12 (newer, weight 1)
    req = Request(history=(10, 12))
    ids, scores = src.retrieve(req, 10, Deadline.in_ms(100))
    # history items are candidates scored like any other: 10 via 12's row (1 * 1), 12 via
    # 10's row (0.9 * 1); 11 via 10's row (0.9 * 1); a tie goes to the smaller id
    assert ids.tolist() == [10, 11, 12]
    assert scores.tolist() == pytest.approx([1.0, 0.9, 0.9])
    # self_weight adds weight x self_weight x the item's own row top (1.0 for both here)
    src2 = CovisitationSource("src", p.model_copy(update={"self_weight": 1.0}), src.context)
    ids, scores = src2.retrieve(req, 10, Deadline.in_ms(100))
    assert dict(zip(ids.tolist(), scores.tolist(), strict=True)) == pytest.approx(
        {10: 1.0 + 0.9, 12: 0.9 + 1.0, 11: 0.9}
    )
    # seed items ("more like this") are what the caller shows: never candidates
    ids, _ = src2.retrieve(Request(history=(12,), seed_items=(10,)), 10, Deadline.in_ms(100))
    assert 10 not in ids.tolist() and 12 in ids.tolist()


class TestCovisitationContract(SourceContract):
    def make_source(self, tmp_path):
        rows = [f"{u},{i},{t}" for u in range(30) for t, i in enumerate(range(u % 7, u % 7 + 8))]
        return build_source(tmp_path, CovisitationSource, CovisitationParams(window=3), rows)

    def known_request(self):
        return Request(user_id=0, history=(0, 1, 2), context={"country": "DE"})


def test_needs_artifacts(tmp_path):
    with pytest.raises(Exception, match="retrieval build"):
        CovisitationSource("c", CovisitationParams(), SourceContext())


def test_interleaved_session_ids_are_regrouped_in_time_order(tmp_path):
    ev = log(
        tmp_path,
        ["1,10,0,a", "1,20,1,b", "1,11,2,a", "1,21,3,b", "1,12,4,a", "2,10,0,a", "2,13,1,a"],
        header="user_id,item_id,timestamp,session_id",
    )
    csr, stats = build_covisitation(
        ev, CovisitationParams(window=1, direction="forward"), tmp_path / "s"
    )
    assert neighbours(csr, ev, 10) == {11: 1.0, 13: 1.0}  # user 2's session "a" is its own
    assert neighbours(csr, ev, 11) == {12: 1.0}
    assert neighbours(csr, ev, 20) == {21: 1.0}
    assert stats["sessions"] == 3


def test_partition_bounds_follow_event_counts():
    from sources.covisitation import _partition_bounds

    items = np.r_[np.zeros(90, np.int32), np.arange(1, 11, dtype=np.int32)]  # item 0 is hot
    bounds = _partition_bounds(items, 100, 4)
    assert bounds[0] == 0 and bounds[-1] == 100 and np.all(np.diff(bounds) >= 0)
    assert bounds[1] == 1  # the hot item is a partition by itself, not a quarter of the ids
    assert _partition_bounds(np.empty(0, np.int32), 0, 3).tolist() == [0, 0, 0, 0]
