"""The compiled kernels against the numpy references they replace: the same candidates, in the
same order, with the same score bits, on random inputs, on scratch growth, across threads, and
for whole blends over every built-in source."""

from __future__ import annotations

import textwrap
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from blender import fanout
from blender.filters import Exclusions
from blender.merge import SourceList, merge, merge_numpy
from retrieval import Retriever, kernels
from retrieval.tools.cli import main
from retrieval.tools.synth import synthesize
from sources import neighbours
from sources.neighbours import aggregate, aggregate_numpy, top_k_per_row


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def random_case(rng: np.random.Generator, n_items: int = 3000) -> dict:
    nnz = int(rng.integers(500, 20_000))
    values = rng.random(nnz).astype(np.float32)
    if rng.random() < 0.4:  # coarse scores: many ties, decided by the smaller id
        values = np.round(values * 4).astype(np.float32)
    csr = top_k_per_row(
        rng.integers(0, n_items, nnz),
        rng.integers(0, n_items, nnz),
        values,
        n_items,
        int(rng.integers(1, 80)),
    )
    rows = np.unique(rng.integers(-1, n_items, int(rng.integers(1, 30)))).astype(np.int32)
    rng.shuffle(rows)
    drop = rng.integers(0, n_items, int(rng.integers(0, 5))).astype(np.int32)
    return {
        "csr": csr,
        "rows": rows,
        "weights": (0.9 ** np.arange(rows.size)).astype(np.float32),
        "k": int(rng.integers(1, 1500)),
        "drop": drop if drop.size else None,
        "self_weight": float(rng.choice([0.0, 1.0, 0.37])),
        "expand_decay": float(rng.choice([0.0, 0.5, 1.0])),
    }


def run_aggregate(fn, case: dict):
    return fn(
        case["csr"],
        case["rows"],
        case["weights"],
        case["k"],
        drop=case["drop"],
        self_weight=case["self_weight"],
        expand_decay=case["expand_decay"],
    )


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide")
def test_neighbour_sums_equal_the_numpy_reference_bit_for_bit():
    rng = np.random.default_rng(7)
    second_hops = 0
    for _ in range(400):
        case = random_case(rng)
        got, want = run_aggregate(aggregate, case), run_aggregate(aggregate_numpy, case)
        assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])
        first, _ = run_aggregate(aggregate, {**case, "expand_decay": 0.0})
        second_hops += got[0].size > first.size
    assert second_hops > 50  # the second hop was exercised, not only the first


def test_a_request_larger_than_the_scratch_table_grows_it():
    rng = np.random.default_rng(3)
    n = 200_000
    csr = top_k_per_row(
        rng.integers(0, n, 2_000_000), rng.integers(0, n, 2_000_000), rng.random(2_000_000), n, 100
    )
    case = {
        "csr": csr,
        "rows": rng.choice(n, 6000, replace=False).astype(np.int32),
        "weights": np.ones(6000, np.float32),
        "k": 5000,
        "drop": None,
        "self_weight": 1.0,
        "expand_decay": 0.5,
    }
    before = kernels.scratch().capacity
    got, want = run_aggregate(aggregate, case), run_aggregate(aggregate_numpy, case)
    assert kernels.scratch().capacity > before >= 0  # ~60k entries: kept for the next call
    assert got[0].size == 5000
    assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])


def test_a_huge_request_does_not_leave_its_table_behind(monkeypatch):
    monkeypatch.setattr(kernels, "_KEEP_SLOTS", 1 << 15)
    rng = np.random.default_rng(8)
    case = random_case(rng)
    case.update(rows=np.arange(2000, dtype=np.int32), weights=np.ones(2000, np.float32))
    result: dict[str, object] = {}

    def fresh_thread() -> None:  # a thread of its own: its table starts at the default size
        got = run_aggregate(aggregate, case)
        result["same"] = all(map(same_bits, got, run_aggregate(aggregate_numpy, case)))
        result["kept"] = kernels.scratch().capacity

    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert result == {"same": True, "kept": kernels.Scratch().capacity}


def random_lists(rng: np.random.Generator, n_sources: int) -> list[SourceList | None]:
    lists: list[SourceList | None] = []
    for _ in range(n_sources):
        if rng.random() < 0.15:
            lists.append(None)
            continue
        n = int(rng.integers(0, 1200))
        ids = rng.choice(np.arange(-50, 4000, dtype=np.int64), n, replace=False)
        scores = np.sort(rng.random(n).astype(np.float32))[::-1].copy()
        if rng.random() < 0.3:
            scores = np.round(scores * 3).astype(np.float32)
        lists.append(
            SourceList(
                ids=ids,
                scores=scores,
                ranks=np.arange(n, dtype=np.int32),
                weight=float(rng.choice([1.0, 0.8, 0.3, 0.0])),
            )
        )
    return lists


@pytest.mark.parametrize("strategy", ["rrf", "score"])
def test_the_merge_equals_the_numpy_reference_bit_for_bit(strategy):
    rng = np.random.default_rng(11)
    for _ in range(300):
        n_sources = int(rng.integers(1, 6))
        lists = random_lists(rng, n_sources)
        exclude = tuple(
            Exclusions(rng.integers(-50, 4000, int(rng.integers(0, 300))).tolist())
            for _ in range(int(rng.integers(0, 3)))
        )
        k = int(rng.integers(0, 3000))
        got = merge(lists, k, strategy, 60.0, exclude)
        want = merge_numpy(lists, k, strategy, 60.0, exclude)
        for a, b in ((got.item_ids, want.item_ids), (got.scores, want.scores)):
            assert same_bits(a, b)
        assert np.array_equal(got.ranks, want.ranks) and got.ranks.shape == want.ranks.shape


def test_kernels_give_each_thread_its_own_scratch():
    rng = np.random.default_rng(5)
    cases = [random_case(rng) for _ in range(40)]
    want = [run_aggregate(aggregate_numpy, c) for c in cases]
    failures: list[int] = []

    def work() -> None:
        for _ in range(5):
            for i, c in enumerate(cases):
                got = run_aggregate(aggregate, c)
                if not (same_bits(got[0], want[i][0]) and same_bits(got[1], want[i][1])):
                    failures.append(i)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def numpy_check_ranked(ids: np.ndarray, scores: np.ndarray) -> tuple[int, bool]:
    finite = np.isfinite(scores)
    if not finite.all():
        return int(np.flatnonzero(~finite)[0]), False
    ordered = np.sort(ids)
    return -1, bool((ordered[1:] == ordered[:-1]).any())


def test_answers_are_checked_by_hashing_like_by_sorting():
    rng = np.random.default_rng(2)
    for _ in range(300):
        n = int(rng.integers(0, 3000))
        ids = rng.integers(-(2**62), 2**62, n, dtype=np.int64)
        scores = rng.random(n).astype(np.float32)
        if n > 1 and rng.random() < 0.5:
            ids[int(rng.integers(1, n))] = ids[int(rng.integers(0, n))]
        if n and rng.random() < 0.3:
            scores[int(rng.integers(0, n))] = rng.choice([np.nan, np.inf, -np.inf])
        assert kernels.check_ranked(ids, scores) == numpy_check_ranked(ids, scores)
    strided = np.arange(20, dtype=np.int64)[::2]  # a strided view is made contiguous first
    assert kernels.check_ranked(strided, np.ones(10, np.float32)) == (-1, False)


CONFIG = """
k: 300
deadline_ms: 5000
artifacts: build
events: {segments: [country]}
blend: {strategy: STRATEGY, exclude_seen: EXCLUDE, fallback: popular}
sources:
  - {name: covisit, kind: covisitation, params: {window: 5, top_k: 50}}
  - {name: itemcf, kind: itemcf, params: {neighbours: 50}}
  - {name: ann, kind: ann, params: {factors: 16, iterations: 5}}
  - {name: popular, kind: popularity, weight: 0.2, params: {segments: [country]}}
  - {name: recent, kind: recent, weight: 0.5}
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    log = root / "log.parquet"
    synthesize(log, n_items=2000, n_users=300, n_events=12_000, seed=4)
    cfg = root / "retrieval.yaml"
    cfg.write_text(textwrap.dedent(CONFIG.replace("STRATEGY", "rrf").replace("EXCLUDE", "false")))
    assert main(["build", str(cfg), "--events", str(log)]) == 0
    return root, log


def blends(cfg, requests):
    with Retriever.from_yaml(cfg) as r:
        return [r.blend(**req) for req in requests]


@pytest.mark.parametrize(("strategy", "exclude_seen"), [("rrf", "false"), ("score", "true")])
def test_whole_blends_equal_the_numpy_path(built, monkeypatch, strategy, exclude_seen):
    """Every built-in source on, 150 users from the log: the compiled path and the numpy
    reference return the same slates, scores, provenance and per-source counts."""
    root, log = built
    cfg = root / f"{strategy}.yaml"
    text = CONFIG.replace("STRATEGY", strategy).replace("EXCLUDE", exclude_seen)
    cfg.write_text(textwrap.dedent(text))
    events = pq.read_table(log, columns=["user_id", "item_id"])
    users = events.column("user_id").to_numpy()
    items = events.column("item_id").to_numpy()
    requests = [
        {
            "user_id": int(u),
            "history": items[users == u][-12:].tolist(),
            "context": {"country": "US"},
            "exclude": items[users == u][:2].tolist(),
        }
        for u in np.unique(users)[:150]
    ]
    compiled = blends(cfg, requests)
    monkeypatch.setattr(neighbours, "aggregate", aggregate_numpy)
    monkeypatch.setattr(fanout, "merge", merge_numpy)
    monkeypatch.setattr(kernels, "check_ranked", numpy_check_ranked)
    reference = blends(cfg, requests)
    for a, b in zip(compiled, reference, strict=True):
        assert same_bits(a.item_ids, b.item_ids)
        assert same_bits(a.scores, b.scores)
        assert np.array_equal(a.ranks, b.ranks)
        assert [(r.name, r.status, r.returned, r.survived) for r in a.reports] == [
            (r.name, r.status, r.returned, r.survived) for r in b.reports
        ]
    assert sum(len(a.item_ids) for a in compiled) > 150 * 200


def test_no_kernel_compiles_on_a_request(built):
    """Every kernel is compiled (or read from cache) at import; a blend adds no signature."""
    root, _ = built
    dispatchers = [kernels._first_hop, kernels._second_hop, kernels._merge_sum]
    before = [len(d.signatures) for d in dispatchers]
    blends(root / "retrieval.yaml", [{"user_id": 1, "history": [1, 2, 3]}])
    assert [len(d.signatures) for d in dispatchers] == before == [1, 1, 1]


def test_a_requests_history_ids_are_made_once_and_spelled_as_before():
    from retrieval.ids import lookup_ids
    from retrieval.types import Request
    from sources.history import weighted_history

    req = Request(history=(5, 7, 5, 9))
    assert req.history_ids is req.history_ids  # one conversion per request, shared by sources
    ids, weights = weighted_history(req, 3, 0.5)
    assert ids.tolist() == [5, 7, 9] and weights.tolist() == [0.5, 0.25, 1.0]
    # A mixed history keeps the old spelling of its window: ints while the window is all ints.
    mixed = Request(history=("sku-1", 7, 5))
    ids, _ = weighted_history(mixed, 2, 0.9)
    assert ids.dtype == np.int64 and ids.tolist() == [5, 7]
    assert lookup_ids(list(mixed.history), "h").dtype.kind == "U"


def test_load_warms_up_with_whole_blends_that_the_breakers_then_forget(built):
    """The warm-up runs real blends over catalogue items (the first request must not pay for
    first calls), and a source failing through all of them still starts with a closed breaker:
    the first real blend reports its ``error``, not ``circuit_open``."""
    root, _ = built
    cfg = root / "warm.yaml"
    cfg.write_text(
        textwrap.dedent(
            """
            k: 50
            artifacts: build
            breaker: {failures: 2}
            sources:
              - {name: covisit, kind: covisitation, params: {window: 5, top_k: 50}}
              - {name: broken, kind: "tests.toy_sources:ListSource", params: {fail: true}}
            """
        )
    )
    with Retriever.from_yaml(cfg) as r:
        broken = next(s for s in r.sources if s.name == "broken")
        assert broken.calls > 2  # the touch, plus whole blends past the breaker's threshold
        res = r.blend(history=[1, 2, 3])
        assert res.report("broken").status.value == "error"
        assert res.report("covisit").status.value == "ok"


def test_the_warm_up_takes_the_paths_of_known_and_anonymous_users(built):
    """Half the warm-up blends are users of the build with logged history (timestamps, event
    types), half anonymous with fresh history: a path first taken by a real request cost it
    up to 2x the p99 (the ANN source's user factors, the event weights)."""
    root, _ = built
    cfg = root / "warm-users.yaml"
    log_source = '{name: log, kind: "tests.toy_sources:RequestLog", params: {items: [1, 2]}}'
    cfg.write_text(f"k: 50\nartifacts: build\nsources:\n  - {log_source}\n")
    users = set(np.load(root / "build" / "ids" / "users.npy").tolist())
    with Retriever.from_yaml(cfg) as r:
        seen = r.sources[0].requests  # type: ignore[attr-defined]
        logged = [q for q in seen if q.history_timestamps is not None]
        anonymous = [q for q in seen if q.user_id is None and q.history]
        assert logged and anonymous
        assert all(q.user_id in users for q in logged)
        assert all(q.history_event_types for q in logged + anonymous)


@pytest.mark.parametrize("seed", range(6))
def test_the_builders_top_k_kernel_equals_the_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    n_rows, n = 300, 20_000
    rows = np.sort(rng.integers(0, n_rows, n)).astype(np.int64)
    cols = rng.integers(0, 5_000, n).astype(np.int32)
    # (row, column) order with unique pairs, as both builders pass them
    key = np.unique((rows << 32) | cols.astype(np.int64))
    rows, cols = key >> 32, (key & 0xFFFFFFFF).astype(np.int32)
    # coarse scores, so ties (broken by the smaller column) are common
    vals = (rng.integers(1, 40, rows.size) / 8).astype(np.float32)
    for k in (1, 7, 100, 10_000):
        got = top_k_per_row(rows, cols, vals, n_rows, k)
        want = neighbours.top_k_per_row_numpy(rows, cols, vals, n_rows, k)
        assert np.array_equal(got.indptr, want.indptr)
        assert np.array_equal(got.indices, want.indices)
        assert got.scores.tobytes() == want.scores.tobytes()


def test_the_builders_top_k_falls_back_to_numpy_out_of_order():
    from retrieval.build_kernels import row_pointers

    rows = np.array([0, 0, 1, 0], np.int64)
    cols = np.array([1, 2, 0, 3], np.int32)
    vals = np.array([0.5, 0.9, 0.1, 0.7], np.float32)
    assert row_pointers(rows, 2) is None  # row 0 comes back after row 1
    got = top_k_per_row(rows, cols, vals, 2, 2)
    assert got.indices.tolist() == [2, 3, 0] and got.indptr.tolist() == [0, 2, 3]


def test_the_builders_top_k_kernel_puts_a_row_in_column_order_for_ties():
    """sparse_dot_topn returns each row's columns in no particular order."""
    rng = np.random.default_rng(7)
    rows = np.repeat(np.arange(50, dtype=np.int64), 40)
    cols = np.concatenate([rng.permutation(1000)[:40] for _ in range(50)]).astype(np.int32)
    vals = (rng.integers(1, 6, rows.size) / 4).astype(np.float32)
    got = top_k_per_row(rows, cols, vals, 60, 9)
    want = neighbours.top_k_per_row_numpy(rows, cols, vals, 60, 9)
    assert np.array_equal(got.indptr, want.indptr)
    assert np.array_equal(got.indices, want.indices)
    assert got.scores.tobytes() == want.scores.tobytes()


@pytest.mark.parametrize("window", [1, 3, 10])
@pytest.mark.parametrize("distance_weight", ["inverse", "constant"])
@pytest.mark.parametrize("direction", ["symmetric", "forward"])
@pytest.mark.parametrize("half_life_days", [None, 7.0])
def test_compiled_pair_counting_equals_the_numpy_reference(
    window, distance_weight, direction, half_life_days
):
    from sources.covisitation import CovisitationParams, count_pairs, count_pairs_numpy

    rng = np.random.default_rng(window)
    n, n_items = 5_000, 300
    items = rng.integers(0, n_items, n).astype(np.int32)  # repeats: same-item pairs are dropped
    session = np.cumsum(rng.random(n) < 0.15).astype(np.int64)
    weight = rng.choice([1.0, 2.0, 0.37], n)
    stamps = np.sort(rng.random(n) * 90 * 86_400)
    params = CovisitationParams(
        window=window,
        distance_weight=distance_weight,
        direction=direction,
        time_decay_half_life_days=half_life_days,
    )
    t_max = float(stamps.max())
    keys, vals = count_pairs(items, session, weight, stamps, n_items, params, t_max)
    want_keys, want_vals = count_pairs_numpy(items, session, weight, stamps, n_items, params, t_max)
    assert keys.size > 0
    assert np.array_equal(keys, want_keys)
    assert vals.tobytes() == want_vals.tobytes()


@pytest.mark.parametrize("seed", range(6))
def test_the_kernels_top_k_equals_the_numpy_reference_under_ties_and_repeats(seed):
    """Ties come in short runs (sorted in place) and long ones (sorted by id); repeated ids keep
    their positions' order."""
    from sources.history import top_k_order

    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(1, 3000))
        levels = int(rng.choice([2, 20, 400, 10**9]))
        scores = rng.integers(0, levels, n).astype(np.float64) / levels
        ids = rng.integers(0, int(rng.choice([n // 4 + 1, 10**12])), n).astype(np.int64)
        for k in (1, 10, n // 2 + 1, n, n + 5):
            got = kernels._top_k(ids, scores, k)
            want = top_k_order(scores, ids, k)
            assert got.tolist() == want.tolist(), (n, levels, k)


@pytest.mark.parametrize("seed", range(4))
def test_first_seen_codes_equal_arrows_dictionary_indices(seed):
    """Session codes from the compiled table: the indices Arrow's dictionary_encode gives, over
    several chunks, with nulls (-1), negative and huge ids, and the table growing."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from retrieval.build_kernels import FirstSeenCodes

    rng = np.random.default_rng(seed)
    chunks = []
    for _ in range(int(rng.integers(1, 6))):
        n = int(rng.integers(0, 60_000))
        span = 10 ** int(rng.integers(1, 18))
        values = rng.integers(-span, span, n)
        chunks.append(pa.array(values, mask=rng.random(n) < 0.1 if seed % 2 else None))
    column = pa.chunked_array(chunks, type=pa.int64())
    encoded = pc.dictionary_encode(column)
    want = [c.indices.fill_null(-1).to_numpy().astype(np.int64) for c in encoded.chunks]
    table, got = FirstSeenCodes(), []
    for chunk in column.chunks:
        out = np.empty(len(chunk), np.int64)
        valid = pc.is_valid(chunk).to_numpy(zero_copy_only=False) if chunk.null_count else None
        table.encode(pc.fill_null(chunk, 0).to_numpy(), valid, out)
        got.append(out)
    assert np.concatenate(got or [np.empty(0, np.int64)]).tolist() == (
        np.concatenate(want or [np.empty(0, np.int64)]).tolist()
    )


@pytest.mark.parametrize("seed", range(4))
def test_the_logs_user_time_order_equals_lexsort(seed):
    """Users' events in and out of time order, tied times keeping the file's order."""
    from retrieval.build_kernels import user_time_order

    rng = np.random.default_rng(seed)
    for case in range(20):
        n, n_users = int(rng.integers(0, 20_000)), int(rng.integers(1, 500))
        users = rng.integers(0, n_users, n).astype(np.int32)
        stamps = rng.integers(0, int(rng.choice([3, 1000])), n).astype(np.float64)
        if case % 3 == 0:
            stamps = np.sort(stamps)
        got, starts = user_time_order(users, stamps, n_users)
        assert got.tolist() == np.lexsort((stamps, users)).tolist()
        by_user = np.repeat(np.arange(n_users, dtype=np.int32), np.diff(starts))
        assert by_user.tolist() == users[got].tolist()


def test_history_sums_equal_the_sum_by_id_reference():
    from sources.history import sum_by_id

    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(0, 60))
        ids = rng.integers(0, int(rng.integers(1, 40)), n).astype(np.int64) - 7
        weights = 0.9 ** rng.integers(0, 60, n).astype(np.float64) * rng.random(n)
        got_ids, got_sums = kernels.sum_unique(ids, weights)
        want_ids, want_sums = sum_by_id(ids, weights)
        assert got_ids.tolist() == want_ids.tolist()
        assert same_bits(got_sums, want_sums.astype(np.float64))


def test_int_id_maps_look_up_like_the_numpy_path():
    from retrieval.artifacts import IdMap

    rng = np.random.default_rng(7)
    ids = np.unique(rng.integers(-(10**12), 10**12, 5000))
    m = IdMap(ids)
    for _ in range(50):
        q = np.concatenate([rng.choice(ids, 30), rng.integers(-(10**12), 10**12, 30)])
        rng.shuffle(q)
        got = m.to_dense(q)
        assert got.dtype == np.int32
        assert got.tolist() == m.to_dense(q.tolist()).tolist()  # a list takes the numpy path
        hit = got[got >= 0]
        assert m.to_external(hit).tolist() == ids[hit].tolist()
    with pytest.raises(IndexError):
        m.to_external(np.array([0, len(ids)], dtype=np.int32))
    with pytest.raises(IndexError):
        m.to_external(np.array([-1], dtype=np.int32))
