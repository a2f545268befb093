"""Reading event logs: formats, encodings, order, and a clear error for every bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval.offline.events import ColumnMap, EventsError, read_events

HEADER = "user_id,item_id,timestamp,event_type,session_id,weight,country"
ROWS = [
    "u2,10,1704067205,click,s1,1,US",
    "u1,11,1704067300.5,cart,s2,2,DE",
    "u2,12,1704067201,click,s1,1,US",
    "u1,10,1704067300.5,order,s2,1,",
    "u3,13,1704067000,click,s3,0.5,NA",
]


def write_csv(path: Path, header: str = HEADER, rows: list[str] = ROWS) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_encodes_and_sorts_by_user_then_time(tmp_path: Path) -> None:
    log = read_events(write_csv(tmp_path / "ev.csv"), segments=["country"])
    assert len(log) == 5
    assert log.user_ids.values.tolist() == ["u1", "u2", "u3"]
    assert log.item_ids.values.tolist() == [10, 11, 12, 13]
    users = log.user_ids.to_external(log.users).tolist()
    items = log.item_ids.to_external(log.items).tolist()
    # sorted by (user, timestamp); the u1 tie keeps file order (stable)
    assert users == ["u1", "u1", "u2", "u2", "u3"]
    assert items == [11, 10, 12, 10, 13]
    assert log.timestamps.tolist() == [
        1704067300.5,
        1704067300.5,
        1704067201,
        1704067205,
        1704067000,
    ]
    assert log.weights.dtype == np.float32 and log.weights.tolist() == [2, 1, 1, 1, 0.5]
    assert log.event_types is not None and log.event_types.dtype == np.int16
    names = [log.event_type_names[c] for c in log.event_types]
    assert names == ["cart", "order", "click", "click", "click"]
    assert log.sessions is not None and log.sessions.dtype == np.int64
    assert log.sessions[0] == log.sessions[1] != log.sessions[2]
    countries = log.segment_values["country"][log.segments["country"]].tolist()
    assert countries == ["DE", "", "US", "US", "NA"]  # empty -> "", and "NA" is Namibia


def test_subset_keeps_maps_and_order(tmp_path: Path) -> None:
    log = read_events(write_csv(tmp_path / "ev.csv"), segments=["country"])
    sub = log.subset(log.timestamps > 1704067200)
    assert len(sub) == 4
    assert sub.user_ids is log.user_ids and sub.item_ids is log.item_ids
    assert sub.segments["country"].shape == (4,)
    assert np.all(np.diff(sub.users) >= 0)
    with pytest.raises(ValueError, match="mask must be bool"):
        log.subset(np.ones(3, dtype=bool))


def test_optional_columns_absent_and_remap(tmp_path: Path) -> None:
    path = tmp_path / "ev.csv"
    path.write_text("customer,sku,ts\n1,a,5\n1,b,3\n")
    log = read_events(path, ColumnMap(user_id="customer", item_id="sku", timestamp="ts"))
    assert log.event_types is None and log.sessions is None and log.event_type_names == ()
    assert log.weights.tolist() == [1.0, 1.0]
    assert log.item_ids.to_external(log.items).tolist() == ["b", "a"]  # time order


def test_parquet_csv_gz_and_iso_timestamps_agree(tmp_path: Path) -> None:
    table = pa.table(
        {
            "user_id": pa.array([5, 5, 9], pa.int64()),
            "item_id": pa.array(["x", "y", "x"]),
            "timestamp": pa.array(
                ["2024-01-01T00:00:10Z", "2024-01-01 01:00:00+01:00", "2024-01-01T00:00:00.5"]
            ),
            "country": pa.array(["US", None, "DE"]),
        }
    )
    pq.write_table(table, tmp_path / "ev.parquet")
    a = read_events(tmp_path / "ev.parquet", segments=["country"])
    expected = [1704067200.0, 1704067210.0, 1704067200.5]  # "+01:00" is midnight UTC
    assert a.timestamps.tolist() == expected
    assert a.segment_values["country"][a.segments["country"]].tolist() == ["", "US", "DE"]

    with gzip.open(tmp_path / "ev.csv.gz", "wt") as f:
        f.write("user_id,item_id,timestamp\n")
        f.write('5,x,2024-01-01T00:00:10Z\n5,y,"2024-01-01 01:00:00+01:00"\n')
        f.write("9,x,2024-01-01T00:00:00.5\n")
    b = read_events(tmp_path / "ev.csv.gz")
    assert b.timestamps.tolist() == expected
    assert np.array_equal(a.items, b.items) and np.array_equal(a.users, b.users)


def test_parquet_timestamp_type_and_pq_extension(tmp_path: Path) -> None:
    ts = pa.array([1_704_067_200_000_000, 1_704_067_201_500_000], pa.timestamp("us"))
    pq.write_table(
        pa.table({"user_id": [1, 1], "item_id": [2, 3], "timestamp": ts}), tmp_path / "e.pq"
    )
    assert read_events(tmp_path / "e.pq").timestamps.tolist() == [1704067200.0, 1704067201.5]


# ---------------------------------------------------------------------------------- errors


def assert_names(exc: pytest.ExceptionInfo[EventsError], path: Path, *parts: str) -> None:
    msg = str(exc.value)
    assert str(path) in msg, msg
    for part in parts:
        assert part in msg, msg


def test_missing_file_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(EventsError, match="not found") as exc:
        read_events(tmp_path / "nope.csv")
    assert_names(exc, tmp_path / "nope.csv")
    (tmp_path / "ev.json").write_text("{}")
    with pytest.raises(EventsError, match="unknown events file extension") as exc:
        read_events(tmp_path / "ev.json")
    assert_names(exc, tmp_path / "ev.json", ".parquet")


def test_missing_required_column_lists_found_and_remap(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "ev.csv", "user,item_id,timestamp", ["1,2,3"])
    with pytest.raises(EventsError, match="missing required column") as exc:
        read_events(path)
    assert_names(exc, path, "'user_id'", "'user'", "columns:")


def test_explicit_optional_column_must_exist(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "ev.csv", "user_id,item_id,timestamp", ["1,2,3"])
    with pytest.raises(EventsError, match="missing required column") as exc:
        read_events(path, ColumnMap(weight="w"))
    assert_names(exc, path, "'w'")


def test_empty_files(tmp_path: Path) -> None:
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(EventsError, match="empty file") as exc:
        read_events(tmp_path / "blank.csv")
    assert_names(exc, tmp_path / "blank.csv")
    path = write_csv(tmp_path / "header.csv", "user_id,item_id,timestamp", [])
    with pytest.raises(EventsError, match="empty file") as exc:
        read_events(path)
    assert_names(exc, path)
    empty = pa.table(
        {
            "user_id": pa.array([], pa.int64()),
            "item_id": pa.array([], pa.int64()),
            "timestamp": pa.array([], pa.float64()),
        }
    )
    pq.write_table(empty, tmp_path / "empty.parquet")
    with pytest.raises(EventsError, match="empty file"):
        read_events(tmp_path / "empty.parquet")


def test_unparsable_timestamp_names_row(tmp_path: Path) -> None:
    rows = [f"u{i},{i},2024-01-0{i % 9 + 1}T00:00:00" for i in range(7)]
    rows.insert(5, "bob,42,yesterday")
    path = write_csv(tmp_path / "ev.csv", "user_id,item_id,timestamp", rows)
    with pytest.raises(EventsError, match="unparsable timestamp") as exc:
        read_events(path)
    assert_names(exc, path, "'timestamp'", "row 6", "line 7", "yesterday", "bob")


def test_null_timestamp(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "ev.csv", "user_id,item_id,timestamp", ["1,2,5", "1,3,"])
    with pytest.raises(EventsError, match="timestamp") as exc:
        read_events(path)
    assert_names(exc, path, "'timestamp'", "row 2")


@pytest.mark.parametrize("column", ["user_id", "item_id"])
def test_null_ids(tmp_path: Path, column: str) -> None:
    rows = ["1,2,5", "1,,6"] if column == "item_id" else ["1,2,5", ",3,6"]
    path = write_csv(tmp_path / "ev.csv", "user_id,item_id,timestamp", rows)
    with pytest.raises(EventsError, match="null") as exc:
        read_events(path)
    assert_names(exc, path, f"'{column}'", "row 2")


def test_null_string_id_in_parquet(tmp_path: Path) -> None:
    table = pa.table({"user_id": ["a", None], "item_id": ["x", "y"], "timestamp": [1.0, 2.0]})
    pq.write_table(table, tmp_path / "ev.parquet")
    with pytest.raises(EventsError, match="null") as exc:
        read_events(tmp_path / "ev.parquet")
    assert_names(exc, tmp_path / "ev.parquet", "'user_id'", "row 2")


@pytest.mark.parametrize("bad", ["-1", "NaN", "inf"])
def test_bad_weights(tmp_path: Path, bad: str) -> None:
    path = write_csv(
        tmp_path / "ev.csv", "user_id,item_id,timestamp,weight", ["1,2,5,1", f"7,3,6,{bad}"]
    )
    with pytest.raises(EventsError, match="negative, NaN") as exc:
        read_events(path)
    assert_names(exc, path, "'weight'", "row 2", "'user_id': '7'")  # CSV ids are read as text


def test_non_numeric_weight(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "ev.csv", "user_id,item_id,timestamp,weight", ["1,2,5,1", "7,3,6,lots"]
    )
    with pytest.raises(EventsError, match="non-numeric") as exc:
        read_events(path)
    assert_names(exc, path, "'weight'", "row 2", "lots")


def test_missing_segment_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "ev.csv")
    with pytest.raises(EventsError, match="segment column") as exc:
        read_events(path, segments=["country", "device"])
    assert_names(exc, path, "'device'", "'country'")


def test_unreadable_parquet(tmp_path: Path) -> None:
    (tmp_path / "ev.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(EventsError, match="cannot read as parquet") as exc:
        read_events(tmp_path / "ev.parquet")
    assert_names(exc, tmp_path / "ev.parquet")


def test_float_ids_are_refused(tmp_path: Path) -> None:
    # The one id rule refuses float ids, integral or not (1e20 and 1e20+1 are one float).
    path = write_csv(tmp_path / "ev.csv", "user_id,item_id,timestamp", ["1,2,5", "1,3.5,6"])
    with pytest.raises(EventsError, match="float ids") as exc:
        read_events(path)
    assert_names(exc, path, "'item_id'", "row 2", "int64")
    integral = write_csv(tmp_path / "ok.csv", "user_id,item_id,timestamp", ["1,2.0,5", "1,3.0,6"])
    with pytest.raises(EventsError, match="float ids") as exc:
        read_events(integral)
    assert_names(exc, integral, "'item_id'", "row 1")
