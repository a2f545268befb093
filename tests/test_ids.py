"""The one id rule (retrieval.ids) wherever ids enter: event logs, id maps, exclusions, the
blocklist, the blender's ``as_id_array`` and evaluation. Findings of a hostile-input review."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from blender.filters import Exclusions, load_blocklist
from retrieval.artifacts import IdMap
from retrieval.errors import IdError, InputError
from retrieval.evaluation.evaluate import Split, _requests, _same_dtype, metrics, split_from_files
from retrieval.ids import id_array, id_keys, id_parts, int_spellings
from retrieval.offline.events import EventsError, read_events
from retrieval.types import as_id_array

HEADER = "user_id,item_id,timestamp"


def csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def parquet(path: Path, **columns: pa.Array) -> Path:
    n = len(next(iter(columns.values())))
    columns.setdefault("timestamp", pa.array(np.arange(n, dtype=np.float64)))
    pq.write_table(pa.table(columns), path)
    return path


def items_of(path: Path) -> list[Any]:
    log = read_events(path)
    return list(log.item_ids.values.tolist())


def assert_error(exc: pytest.ExceptionInfo[EventsError], path: Path, *parts: str) -> None:
    msg = str(exc.value)
    for part in (str(path), "int64", "strings", *parts):
        assert part in msg, msg


# ------------------------------------------------------------------- 1. overflowing integer ids


@pytest.mark.parametrize("big", [2**63, 2**64 + 5, 10**30])
def test_csv_integer_ids_beyond_int64_are_an_error(tmp_path: Path, big: int) -> None:
    path = csv(tmp_path / "ev.csv", ["1,7,1", f"1,{big},2", f"2,{big + 1},3"])
    with pytest.raises(EventsError, match="beyond int64") as exc:
        read_events(path)
    assert_error(exc, path, "'item_id'", "row 2", str(big))


def test_parquet_uint64_ids_beyond_int64_are_an_error(tmp_path: Path) -> None:
    ids = pa.array([5, 2**63, 2**64 - 1], pa.uint64())
    path = parquet(tmp_path / "ev.parquet", user_id=pa.array([1, 1, 2]), item_id=ids)
    with pytest.raises(EventsError, match="beyond int64") as exc:
        read_events(path)
    assert_error(exc, path, "'item_id'", "row 2")
    fine = parquet(
        tmp_path / "ok.parquet",
        user_id=pa.array([1, 1], pa.uint64()),
        item_id=pa.array([2**63 - 1, 3], pa.uint64()),
    )
    assert items_of(fine) == [3, 2**63 - 1]


def test_parquet_float_ids_are_an_error(tmp_path: Path) -> None:
    path = parquet(
        tmp_path / "ev.parquet", user_id=pa.array([1, 2]), item_id=pa.array([1e20, 1e20 + 1])
    )
    with pytest.raises(EventsError, match="float ids are refused") as exc:
        read_events(path)
    assert_error(exc, path, "'item_id'", "double")


# -------------------------------------------------------- 2. zero-padded ids stay their own items


def test_csv_zero_padded_ids_stay_distinct_strings(tmp_path: Path) -> None:
    path = csv(tmp_path / "ev.csv", ["1,00123,1", "1,123,2", "2,+5,3", "2,5,4", "2,-0,5", "3,0,6"])
    log = read_events(path)
    assert log.item_ids.is_str
    assert log.item_ids.values.tolist() == ["+5", "-0", "0", "00123", "123", "5"]
    assert len(np.unique(log.items)) == 6
    # lookups follow the same rule: 123 finds "123", never "00123"
    ids = log.item_ids
    assert ids.values[ids.to_dense([123, "00123", 5])].tolist() == ["123", "00123", "5"]
    assert log.user_ids.values.dtype == np.int64  # canonical int text is int64


def test_csv_canonical_int_text_is_int64_with_negatives(tmp_path: Path) -> None:
    path = csv(tmp_path / "ev.csv", ["-3,-9223372036854775808,1", "4,9223372036854775807,2"])
    log = read_events(path)
    assert log.user_ids.values.tolist() == [-3, 4]
    assert log.item_ids.values.dtype == np.int64
    assert log.item_ids.values.tolist() == [-(2**63), 2**63 - 1]


def test_parquet_string_and_dictionary_columns_follow_the_rule(tmp_path: Path) -> None:
    texts = pa.array(["00123", "123", "7", "00123"])
    path = parquet(tmp_path / "a.parquet", user_id=pa.array(["1", "2", "3", "4"]), item_id=texts)
    log = read_events(path)  # string columns are read dictionary-encoded
    assert log.user_ids.values.tolist() == [1, 2, 3, 4]  # all canonical: int64
    assert log.item_ids.values.tolist() == ["00123", "123", "7"]
    dict_ids = pa.array(["9", "10", "9", "11"]).dictionary_encode()
    table = pa.table({"user_id": [1, 2, 3, 4], "item_id": dict_ids, "timestamp": [1.0, 2, 3, 4]})
    pq.write_table(table, tmp_path / "b.parquet")
    assert items_of(tmp_path / "b.parquet") == [9, 10, 11]
    huge = parquet(
        tmp_path / "c.parquet", user_id=pa.array([1, 2]), item_id=pa.array(["1", str(2**64)])
    )
    assert items_of(huge) == ["1", str(2**64)]  # a string column of huge numbers: strings


def test_parquet_empty_string_id_names_its_row(tmp_path: Path) -> None:
    path = parquet(
        tmp_path / "ev.parquet", user_id=pa.array([1, 2, 3]), item_id=pa.array(["a", "b", ""])
    )
    with pytest.raises(EventsError, match="empty ids") as exc:
        read_events(path)
    assert_error(exc, path, "'item_id'", "row 3")


# ------------------------------------------------------------------------- 3. boolean id columns


def test_boolean_id_columns_are_an_error(tmp_path: Path) -> None:
    path = parquet(
        tmp_path / "ev.parquet", user_id=pa.array([True, False]), item_id=pa.array([1, 2])
    )
    with pytest.raises(EventsError, match="boolean") as exc:
        read_events(path)
    assert_error(exc, path, "'user_id'")
    text = csv(tmp_path / "ev.csv", ["true,1,1", "false,2,2"])
    with pytest.raises(EventsError, match="boolean") as exc:
        read_events(text)
    assert_error(exc, text, "'user_id'")


# --------------------------------------------------------------------------- 4. float id columns


def test_csv_float_id_columns_are_an_error(tmp_path: Path) -> None:
    path = csv(tmp_path / "ev.csv", ["1,2.0,1", "1,1e20,2"])
    with pytest.raises(EventsError, match="float ids") as exc:
        read_events(path)
    assert_error(exc, path, "'item_id'", "row 1", "2.0")
    # text that merely contains a dot, among other strings, is a string id
    assert items_of(csv(tmp_path / "s.csv", ["1,v2.0,1", "1,2.0,2"])) == ["2.0", "v2.0"]


def test_events_error_is_an_input_error() -> None:
    assert issubclass(EventsError, InputError) and issubclass(EventsError, ValueError)


# ------------------------------------------------------------------ 5. one rule in every module

QUERIES = ["+5", " 7", "00123", "-5", "123", "7 ", "-0"]


def test_idmap_and_exclusions_agree_on_spellings() -> None:
    m, _ = IdMap.from_values(np.array([5, 7, 123, -5, 0], dtype=np.int64))
    found = m.to_dense(QUERIES) >= 0
    assert found.tolist() == [False, False, False, True, True, False, False]
    excl = Exclusions(QUERIES)
    assert (~excl.mask(np.array([5, 7, 123, -5, 0]))).tolist() == [False, False, True, True, False]
    assert len(excl) == 7  # "-5" is -5 and "123" is 123: still seven distinct ids
    # and a string catalog: an int exclude removes its canonical text, never a padded one
    assert Exclusions([123, -5]).mask(np.array(["123", "00123", "-5", "+5"])).tolist() == [
        False,
        True,
        False,
        True,
    ]


def test_floats_and_bools_are_never_ids_anywhere() -> None:
    m, _ = IdMap.from_values(np.array([1, 2], dtype=np.int64))
    assert m.to_dense([1.0, 2.0, True, None]).tolist() == [-1, -1, -1, -1]
    assert m.to_dense(np.array([1.0, 2.0])).tolist() == [-1, -1]
    for bad in ([1.0], [True], [None], [2**63], [""], [1, "a"]):
        if bad != [1, "a"]:  # a request's exclusions are lookups: kinds may mix there
            with pytest.raises(IdError):
                Exclusions(bad)
        with pytest.raises(IdError):
            as_id_array(bad)
        with pytest.raises(IdError):
            IdMap.from_values(np.asarray(bad, dtype=object))
    mixed = Exclusions([1, "a", "42", 7])
    assert mixed.mask(np.array([1, 42, 7, 3])).tolist() == [False, False, False, True]
    assert mixed.mask(np.array(["a", "1", "b"])).tolist() == [False, False, True]


def test_as_id_array_is_the_rule() -> None:
    assert as_id_array(["42", "-7"]).tolist() == [42, -7]
    assert as_id_array(np.array(["00123", "123"])).tolist() == ["00123", "123"]
    assert as_id_array([1, "2"]).dtype == np.int64
    with pytest.raises(IdError, match="does not fit in int64"):
        as_id_array(np.array([2**64 - 1], dtype=np.uint64))  # was silently -1
    with pytest.raises(IdError, match="float"):
        as_id_array(np.array([1.0, 2.0]))
    with pytest.raises(IdError, match="mixes"):
        as_id_array([1, "sku-1"])


def test_uint64_lookup_is_missing_not_wrapped() -> None:
    m, _ = IdMap.from_values(np.array([-1, 3], dtype=np.int64))
    assert m.to_dense(np.array([2**64 - 1, 3], dtype=np.uint64)).tolist() == [-1, 1]


def test_blocklist_keeps_padded_ids_apart(tmp_path: Path) -> None:
    path = tmp_path / "block.txt"
    path.write_text("00123\n123\n+5\n")
    assert load_blocklist(path).tolist() == ["+5", "00123", "123"]
    path.write_text("7\n-3 # negative\n7\n")
    got = load_blocklist(path)
    assert got.dtype == np.int64 and got.tolist() == [-3, 7]


def test_evaluation_keeps_negative_and_text_ids() -> None:
    targets = np.array([-5, 7], dtype=np.int64)
    assert _same_dtype(np.array(["-5", "00007", "7", "x"]), targets).tolist() == [-5, 7]
    assert _same_dtype(np.array([-5, 7]), np.array(["a"])).tolist() == ["-5", "7"]
    split = Split(train=None, users=np.array([1]), targets=[targets], cutoff=None)  # type: ignore[arg-type]
    got = metrics([np.array(["-5", "x"])], split, [np.empty(0, np.int64)], [2])
    assert got["recall@2"] == pytest.approx(0.5)


def test_evaluation_finds_train_history_across_id_kinds(tmp_path: Path) -> None:
    train = read_events(csv(tmp_path / "train.csv", ["1,10,1", "1,11,2", "2,12,3"]))
    # the test log spells user 1 as "1" but also has a zero-padded user, so it is a str map
    test = read_events(csv(tmp_path / "test.csv", ["1,13,9", "007,10,9"]))
    assert train.user_ids.values.dtype == np.int64 and test.user_ids.is_str
    split = split_from_files(train, test, max_users=None)
    by_user = {r.user_id: r.history for r in _requests(split, history_len=5, k_max=3)}
    assert by_user == {"007": (), "1": (10, 11)}


# --------------------------------------------------------------- 6. exclusions are vectorised


def python_calls(fn: Callable[[], object]) -> int:
    """Python and builtin calls made while ``fn`` runs (a per-id loop makes one per id)."""
    count = 0

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        count += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


@pytest.mark.parametrize(
    "make",
    [
        lambda n: np.arange(n) * 7 - 500,
        lambda n: (np.arange(n) * 7 - 500).tolist(),
        lambda n: (np.arange(n) * 7 - 500).astype(str),
        lambda n: [str(i) for i in range(-500, n - 500)],
        lambda n: np.array([f"sku-{i}" for i in range(n)]),
        lambda n: [f"sku-{i}" for i in range(n)],
        lambda n: frozenset(range(n)),
        lambda n: np.array([f"0{i}" if i % 2 else str(i) for i in range(n)]),
    ],
    ids=[
        "int-array",
        "int-list",
        "num-text-array",
        "num-text-list",
        "str-array",
        "str-list",
        "int-frozenset",
        "mixed-text-array",
    ],
)
def test_exclusions_build_has_no_per_id_python_loop(make: Callable[[int], Any]) -> None:
    Exclusions(make(50))  # warm up lazy imports
    ids = make(20_000)
    assert python_calls(lambda: Exclusions(ids, make(10))) < 1_000


def test_exclusions_of_many_ids_are_exact() -> None:
    rng = np.random.default_rng(0)
    ints = rng.integers(-(10**15), 10**15, 30_000)
    texts = np.array([f"0{i}" for i in ints[:100].tolist()])  # padded: strings, never ints
    excl = Exclusions(ints.astype(str), texts)
    assert len(excl) == np.unique(ints).size + 100
    probe = np.concatenate([ints[:50], ints[:50] + 1])
    want = ~np.isin(probe, ints)
    assert np.array_equal(excl.mask(probe), want)
    assert np.array_equal(excl.allowed_sorted(np.unique(probe)), ~np.isin(np.unique(probe), ints))
    assert not excl.mask(texts[:3]).any() and excl.mask(np.array([f"00{ints[0]}"])).all()


# ---------------------------------------------------------------------- the rule's helpers


def test_int_spellings_match_python_on_edge_cases() -> None:
    cases = [
        "0",
        "-0",
        "00",
        "007",
        "42",
        "-42",
        "+5",
        " 7",
        "7 ",
        "1e3",
        "",
        "-",
        "1-2",
        "12\x003",
        "٣",
        str(2**63 - 1),
        str(2**63),
        str(-(2**63)),
        str(-(2**63) - 1),
        "1234567890",
        "-12345678901",
        "9" * 19,
        "9" * 20,
    ]
    ok, values = int_spellings(np.array(cases))  # type: ignore[misc]
    for text, good, value in zip(cases, ok.tolist(), values.tolist(), strict=True):
        want = (
            text == str(int(text))
            if text.lstrip("-").isascii() and text.lstrip("-").isdigit()
            else False
        )
        want = want and -(2**63) <= int(text) < 2**63
        assert good == want, text
        if want:
            assert value == int(text), text


def test_id_parts_and_keys() -> None:
    ints, strs = id_parts(np.array(["5", "00123", "x", "-5"]))
    assert ints.tolist() == [5, -5] and strs.tolist() == ["00123", "x"]
    ok, keys = id_keys([5, "6", "+7", 1.5, None, True, "-8"], as_str=False)
    assert ok.tolist() == [True, True, False, False, False, False, True]
    assert keys[ok].tolist() == [5, 6, -8]
    ok, keys = id_keys(np.array([3, -4]), as_str=True)
    assert ok.all() and keys.tolist() == ["3", "-4"]
    assert id_array("abc").tolist() == ["abc"] and id_array(5).tolist() == [5]
