"""Reading and validating event logs (CSV or Parquet) into dense, sorted numpy columns.

Everything is columnar (pyarrow reads and dictionary-encodes, numpy sorts), so a log's cost is a
few vectorised passes per column and no Python object per event (figures at scale:
``benchmarks/README.md``). Every problem is found before anything is returned, and reported with
the file, the column and a sample bad row, because the person who reads the message is looking
at the file, not at our code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from retrieval.artifacts import IdMap
from retrieval.config import ColumnMap
from retrieval.errors import InputError
from retrieval.ids import INT64_MAX
from retrieval.types import (  # re-exported: their old home
    DEFAULT_EVENT_WEIGHTS,
    event_weight_vector,
)

__all__ = [
    "DEFAULT_EVENT_WEIGHTS",
    "ColumnMap",
    "EventLog",
    "EventsError",
    "event_weight_vector",
    "read_events",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

_CSV_SUFFIXES = (".csv", ".csv.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_NUMERIC = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
_ZONED = r"(Z|z|[+-]\d{2}:?\d{2})\s*$"
_NUMBER_TEXT = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_ID_RULE = "ids must be int64 integers or non-empty strings"
_BOOL_TEXT = pa.array(["true", "false", "True", "False", "TRUE", "FALSE"])  # pyarrow's bools


class EventsError(InputError):
    """An event log that cannot be used; the message names the file, column and a bad row.

    An :class:`~retrieval.errors.InputError`, so still a ``ValueError``.
    """


@dataclass(frozen=True)
class EventLog:
    """Events sorted by (user, timestamp), stably, with dense user and item indices.

    Sessionization and "last n items" logic downstream rely on that order.
    """

    users: npt.NDArray[np.int32]
    items: npt.NDArray[np.int32]
    timestamps: npt.NDArray[np.float64]
    weights: npt.NDArray[np.float32]
    event_types: npt.NDArray[np.int16] | None
    event_type_names: tuple[str, ...]
    sessions: npt.NDArray[np.int64] | None
    segments: dict[str, npt.NDArray[np.int32]]
    segment_values: dict[str, npt.NDArray[np.str_]]
    user_ids: IdMap
    item_ids: IdMap
    path: Path
    _n: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_n", int(self.users.shape[0]))

    def __len__(self) -> int:
        return self._n

    def subset(self, mask: npt.NDArray[np.bool_]) -> EventLog:
        """The events where ``mask`` holds, same id maps (so indices stay comparable).

        Selecting keeps the (user, timestamp) order, which is how time splits stay sorted.
        """
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (len(self),):
            raise ValueError(
                f"mask must be bool of shape ({len(self)},), got {mask.dtype} {mask.shape}"
            )
        return EventLog(
            users=self.users[mask],
            items=self.items[mask],
            timestamps=self.timestamps[mask],
            weights=self.weights[mask],
            event_types=None if self.event_types is None else self.event_types[mask],
            event_type_names=self.event_type_names,
            sessions=None if self.sessions is None else self.sessions[mask],
            segments={k: v[mask] for k, v in self.segments.items()},
            segment_values=dict(self.segment_values),
            user_ids=self.user_ids,
            item_ids=self.item_ids,
            path=self.path,
        )


def read_events(
    path: Path | str,
    columns: ColumnMap | None = None,
    segments: Sequence[str] = (),
    *,
    read_sessions: bool = True,
) -> EventLog:
    """Read, validate, encode and sort an event log (``.csv``, ``.csv.gz``, ``.parquet``, ``.pq``).

    Required columns: user id, item id, timestamp (unix seconds as int/float, or ISO-8601 text).
    Optional columns (``event_type``, ``session_id``, ``weight``) are used when present; naming
    one explicitly in ``columns`` makes it required. ``segments`` are columns to keep as coded
    per-event values (e.g. country); missing values become the empty string. ``read_sessions=False``
    leaves the session column unread (at 100M events it decodes to 800 MB).
    """
    path = Path(path)
    cols = columns or ColumnMap()
    table = _read_table(path, cols, list(segments), read_sessions)
    n = table.num_rows
    names = set(table.column_names)
    ctx = _Ctx(path, table, keep=segments)
    del table  # ctx drops each column once encoded, so raw and encoded copies barely overlap

    # Each column is dropped as soon as it is encoded, so the raw table shrinks while the
    # encoded arrays grow (an error's row then shows the columns not yet encoded).
    timestamps = _timestamps(ctx, cols.timestamp)
    ctx.drop(cols.timestamp)
    weights = _weights(ctx, cols.weight) if cols.weight in names else np.ones(n, np.float32)
    ctx.drop(cols.weight)
    users, user_ids = _encode_ids(ctx, cols.user_id)
    ctx.drop(cols.user_id)
    items, item_ids = _encode_ids(ctx, cols.item_id)
    ctx.drop(cols.item_id)

    event_types: npt.NDArray[np.int16] | None = None
    event_type_names: tuple[str, ...] = ()
    if cols.event_type in names:
        codes, values = _encode_labels(ctx, cols.event_type)
        if len(values) > np.iinfo(np.int16).max:
            ctx.fail(cols.event_type, 0, f"has {len(values)} distinct values; at most 32767")
        event_types = codes.astype(np.int16)
        event_type_names = tuple(values.tolist())
        ctx.drop(cols.event_type)

    sessions: npt.NDArray[np.int64] | None = None
    if cols.session_id in names:
        sessions = _encode_sessions(ctx, cols.session_id)
        ctx.drop(cols.session_id)

    seg_codes: dict[str, npt.NDArray[np.int32]] = {}
    seg_values: dict[str, npt.NDArray[np.str_]] = {}
    for seg in segments:
        seg_codes[seg], seg_values[seg] = _encode_labels(ctx, seg)
    del ctx

    # Gather one column at a time so only one extra column is alive at once (``np.take``: a
    # quarter faster than fancy indexing on 100M rows, the same values).
    from retrieval.build_kernels import user_time_order  # numba, compiled once and cached

    order, starts = user_time_order(users, timestamps, len(user_ids))
    users = np.repeat(np.arange(len(user_ids), dtype=np.int32), np.diff(starts))
    items = np.take(items, order)
    timestamps = np.take(timestamps, order)
    weights = np.take(weights, order)
    if event_types is not None:
        event_types = np.take(event_types, order)
    if sessions is not None:
        sessions = np.take(sessions, order)
    for seg in seg_codes:
        seg_codes[seg] = np.take(seg_codes[seg], order)
    del order
    # Arrow's allocator keeps what decoding freed for reuse (gigabytes on a large log; figure in
    # benchmarks/README.md), and every builder's peak would sit on top of it: hand it back.
    pa.default_memory_pool().release_unused()
    return EventLog(
        users=users,
        items=items,
        timestamps=timestamps,
        weights=weights,
        event_types=event_types,
        event_type_names=event_type_names,
        sessions=sessions,
        segments=seg_codes,
        segment_values=seg_values,
        user_ids=user_ids,
        item_ids=item_ids,
        path=path,
    )


# --------------------------------------------------------------------------------------------
# reading


def _read_table(path: Path, cols: ColumnMap, segments: list[str], read_sessions: bool) -> pa.Table:
    """Only the needed columns, strings dictionary-encoded where the format allows it."""
    if not path.exists():
        raise EventsError(f"{path}: events file not found")
    if not path.is_file():
        raise EventsError(f"{path}: not a file")
    name = path.name.lower()
    if name.endswith(_PARQUET_SUFFIXES):
        kind = "parquet"
    elif name.endswith(_CSV_SUFFIXES):
        kind = "csv"
    else:
        raise EventsError(
            f"{path}: unknown events file extension; expected one of "
            f"{', '.join(_CSV_SUFFIXES + _PARQUET_SUFFIXES)}"
        )
    try:
        found = _column_names(path, kind)
    except (pa.ArrowException, OSError) as exc:
        if "Empty CSV" in str(exc):
            raise EventsError(f"{path}: empty file (no header and no rows)") from exc
        raise EventsError(f"{path}: cannot read as {kind} ({exc})") from exc

    required = {"user_id": cols.user_id, "item_id": cols.item_id, "timestamp": cols.timestamp}
    missing = [f"{role} (column {col!r})" for role, col in required.items() if col not in found]
    # An optional column named explicitly in the config is expected to exist.
    missing += [
        f"{role} (column {getattr(cols, role)!r})"
        for role in ("event_type", "session_id", "weight")
        if role in cols.model_fields_set and getattr(cols, role) not in found
    ]
    if missing:
        raise EventsError(
            f"{path}: missing required column(s) {', '.join(missing)}; columns found: "
            f"{', '.join(repr(c) for c in found) or 'none'}. If your file names them "
            "differently, map them in the YAML `columns:` section (e.g. `user_id: customer`)."
        )
    absent = [s for s in segments if s not in found]
    if absent:
        raise EventsError(
            f"{path}: segment column(s) {', '.join(repr(s) for s in absent)} named in the config "
            f"are not in the file; columns found: {', '.join(repr(c) for c in found)}"
        )

    optional = [cols.event_type, *([cols.session_id] if read_sessions else []), cols.weight]
    wanted = list(
        dict.fromkeys([*required.values(), *(c for c in optional if c in found), *segments])
    )
    labels = [c for c in (cols.event_type, *segments) if c in wanted]
    try:
        if kind == "parquet":
            schema = pq.read_schema(path)
            stringy = [
                c
                for c in wanted
                if pa.types.is_string(schema.field(c).type)
                or pa.types.is_large_string(schema.field(c).type)
            ]
            table = pq.read_table(path, columns=wanted, read_dictionary=stringy)
        else:
            dict_type = pa.dictionary(pa.int32(), pa.string())
            # Id columns as text: type inference would read "00123" as 123 (merging it with
            # "123") and 2**64 as a float; _encode_ids applies the id rule to the text instead.
            types: dict[str, pa.DataType] = {c: pa.string() for c in (cols.user_id, cols.item_id)}
            types.update({c: dict_type for c in labels})
            table = pcsv.read_csv(
                path,
                convert_options=pcsv.ConvertOptions(
                    include_columns=wanted,
                    column_types=types,
                    strings_can_be_null=True,
                    null_values=[""],  # only empty fields: "NA" is Namibia, not missing
                ),
            )
    except (pa.ArrowException, OSError) as exc:
        raise EventsError(f"{path}: cannot read as {kind} ({exc})") from exc
    if table.num_rows == 0:
        raise EventsError(f"{path}: empty file (a header but no rows)")
    return table


def _column_names(path: Path, kind: str) -> list[str]:
    if kind == "parquet":
        return list(pq.read_schema(path).names)
    with pcsv.open_csv(path) as reader:
        return list(reader.schema.names)


class _Ctx:
    """The file and table being validated, to point at a bad row in error messages."""

    def __init__(self, path: Path, table: pa.Table, keep: Sequence[str] = ()) -> None:
        self.path = path
        self.table = table
        self.keep = set(keep)
        self.csv = not path.name.lower().endswith(_PARQUET_SUFFIXES)

    def col(self, name: str) -> pa.ChunkedArray:
        return self.table.column(name)

    def drop(self, name: str) -> None:
        """Release a consumed column (unless a later step still reads it), and hand what it
        held back to the system: Arrow's allocator would keep it for reuse, and the arrays
        encoded next would come on top (at 100M events the read peaked 2.3x higher)."""
        if name in self.table.column_names and name not in self.keep:
            self.table = self.table.drop_columns([name])
            pa.default_memory_pool().release_unused()

    def fail(self, column: str, row: int, problem: str) -> NoReturn:
        values = self.table.slice(row, 1).to_pylist()[0]
        where = f"row {row + 1}" + (f" (line {row + 2})" if self.csv else "")
        raise EventsError(f"{self.path}: column {column!r} {problem}; e.g. {where}: {values}")

    def check_nulls(self, column: str, arr: pa.ChunkedArray, what: str = "null/empty ids") -> None:
        if arr.null_count:
            row = pc.index(pc.is_null(arr), True).as_py()
            self.fail(column, row, f"has {arr.null_count} {what}")


def _combine(arr: pa.ChunkedArray) -> pa.Array:
    return arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)


def _dict_parts(arr: pa.ChunkedArray) -> tuple[npt.NDArray[np.int32], pa.Array]:
    """Dictionary-encode (hash, O(n)) and return int32 codes plus the distinct values."""
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    else:
        arr = arr.unify_dictionaries()
    if arr.num_chunks == 0:
        return np.empty(0, np.int32), pa.array([], type=arr.type.value_type)
    dictionary = arr.chunk(0).dictionary
    indices = pa.chunked_array([c.indices for c in arr.chunks], type=arr.type.index_type)
    if indices.null_count:
        indices = pc.fill_null(indices, 0)  # callers mask null rows themselves
    codes = indices.to_numpy().astype(np.int32, copy=False)
    return codes, dictionary


def _encode_ids(ctx: _Ctx, column: str) -> tuple[npt.NDArray[np.int32], IdMap]:
    """Dense int32 codes ordered like the sorted external ids, and the map back.

    The one id rule (``retrieval.ids``) on whole columns, in Arrow compute and numpy (no Python
    loop over rows): integer columns are range-checked (a uint64 above int64 is refused, never
    wrapped); text columns are int64 ids when every value is canonical int text (``"42"``,
    ``"-7"``), else string ids, so ``"00123"`` and ``"123"`` stay two items. CSV id columns are
    always read as text. Bool, float and other column types, empty ids and, in a CSV, integer
    text beyond int64 or float text (``"2.0"``) are refused with the row that shows it.
    """
    arr = ctx.col(column)
    ctx.check_nulls(column, arr)
    t = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
    if pa.types.is_boolean(t):
        ctx.fail(column, 0, f"is boolean (true/false), not ids; {_ID_RULE}")
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        ctx.fail(
            column,
            0,
            f"has type {t}: float ids are refused (1e20 and 1e20+1 are the same float); "
            f"{_ID_RULE}, so write the column as int64 or string",
        )
    if pa.types.is_integer(t):
        codes, dictionary = _dict_parts(_int64_column(ctx, column, arr, t))
        id_map, dict_codes = IdMap.from_values(dictionary.to_numpy())
        return dict_codes[codes], id_map
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        if not (pa.types.is_binary(t) or pa.types.is_large_binary(t) or _is_string_view(t)):
            ctx.fail(column, 0, f"has type {t}; {_ID_RULE}")
        try:
            arr = arr.cast(
                pa.dictionary(pa.int32(), pa.string())
                if pa.types.is_dictionary(arr.type)
                else pa.string()
            )
        except pa.ArrowException as exc:
            ctx.fail(column, 0, f"has bytes that are not UTF-8 text ({exc}); {_ID_RULE}")
    if not pa.types.is_dictionary(arr.type):
        # Mostly a CSV column: check the rows themselves, because hashing the strings costs
        # more than hashing the ints they spell (benchmarks/README.md); only a column of
        # strings gets dictionary-encoded.
        ints = _int_texts(ctx, column, arr, None)
        if ints is not None:
            codes, dictionary = _dict_parts(ints)
            id_map, dict_codes = IdMap.from_values(dictionary.to_numpy())
            return dict_codes[codes], id_map
    codes, dictionary = _dict_parts(arr)
    return _text_ids(ctx, column, codes, dictionary)


def _is_string_view(t: pa.DataType) -> bool:
    check = getattr(pa.types, "is_string_view", None)
    return bool(check is not None and check(t))


def _int64_column(ctx: _Ctx, column: str, arr: pa.ChunkedArray, t: pa.DataType) -> pa.ChunkedArray:
    """An integer column as int64; a uint64 value above int64 is refused (never wrapped)."""
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(t)
    if pa.types.is_uint64(t):
        big = pc.greater(arr, pa.scalar(INT64_MAX, pa.uint64()))
        if pc.any(big).as_py():
            row = pc.index(big, True).as_py()
            ctx.fail(
                column,
                row,
                f"has id {arr[row].as_py()}, beyond int64 (uint64 column); {_ID_RULE}: "
                "store such ids as strings",
            )
    return arr.cast(pa.int64())


def _first_row(bad: npt.NDArray[np.bool_], codes: npt.NDArray[np.int32] | None) -> int:
    """The first row showing a bad value: ``bad`` is over the rows, or over the dictionary
    values when ``codes`` maps rows to them."""
    if codes is None:
        return int(np.argmax(bad))
    return int(np.argmax(bad[codes]))


def _int_texts(
    ctx: _Ctx,
    column: str,
    values: pa.Array | pa.ChunkedArray,
    codes: npt.NDArray[np.int32] | None,
) -> pa.Array | pa.ChunkedArray | None:
    """The int64s of ``values`` (non-null text) when every one is canonical int text, else
    None (they are string ids). In a CSV, integer text beyond int64 is an error, not strings.

    ``codes`` maps rows to ``values`` when these are a dictionary (for the row in a message).
    """
    neg = pc.starts_with(values, "-")
    body = (
        pc.if_else(neg, pc.utf8_slice_codeunits(values, 1), values)
        if pc.any(neg).as_py()
        else values
    )
    if not pc.all(pc.ascii_is_decimal(body)).as_py():  # also false for "" and "-"
        return None
    padded = pc.and_(pc.starts_with(body, "0"), pc.or_(pc.greater(pc.binary_length(body), 1), neg))
    if pc.any(padded).as_py():  # "007", "-0": strings
        return None
    try:
        return pc.cast(values, pa.int64())
    except pa.ArrowInvalid:
        if not ctx.csv:
            return None  # a string column of huge numbers: string ids, as the rule says
    flat = _combine(values) if isinstance(values, pa.ChunkedArray) else values
    at = _first_failure(flat, lambda a: a.cast(pa.int64()))
    bad = np.zeros(len(flat), dtype=bool)
    bad[at] = True
    ctx.fail(
        column,
        _first_row(bad, codes),
        f"has integer id {flat[at].as_py()} beyond int64; {_ID_RULE} (CSV integer text is "
        "read as int64: store such ids as a Parquet string column)",
    )


def _text_ids(
    ctx: _Ctx, column: str, codes: npt.NDArray[np.int32], dictionary: pa.Array
) -> tuple[npt.NDArray[np.int32], IdMap]:
    """Codes and map for a text column, from its distinct values."""
    if not pa.types.is_string(dictionary.type):
        dictionary = dictionary.cast(pa.string())
    empty = np.asarray(pc.equal(pc.binary_length(dictionary), 0))
    if empty.any():
        ctx.fail(column, _first_row(empty, codes), f"has empty ids; {_ID_RULE}")
    ints = _int_texts(ctx, column, dictionary, codes)
    if ints is not None:
        id_map, dict_codes = IdMap.from_values(ints.to_numpy())
        return dict_codes[codes], id_map
    if ctx.csv and pc.all(pc.is_in(dictionary, value_set=_BOOL_TEXT)).as_py():
        ctx.fail(column, 0, f"is boolean (true/false), not ids; {_ID_RULE}")
    if ctx.csv and pc.all(pc.match_substring_regex(dictionary, _NUMBER_TEXT)).as_py():
        # Every value is a number and some are not integers: pyarrow (and pandas) would have
        # read a float column here, e.g. ids written as 2.0 by a tool that saw a NaN.
        floaty = np.asarray(pc.match_substring_regex(dictionary, "[.eE]"))
        if floaty.any():
            ctx.fail(
                column,
                _first_row(floaty, codes),
                f"has float ids (numbers with a decimal point or exponent); {_ID_RULE}: "
                "write them as integers",
            )
    id_map, dict_codes = _sorted_strings(dictionary)
    return dict_codes[codes], id_map


def _sorted_strings(dictionary: pa.Array) -> tuple[IdMap, npt.NDArray[np.int32]]:
    """Sort distinct strings in Arrow (UTF-8 byte order equals numpy code-point order)."""
    order = np.asarray(pc.sort_indices(dictionary))
    rank = np.empty(order.shape[0], dtype=np.int32)
    rank[order] = np.arange(order.shape[0], dtype=np.int32)
    values = dictionary.take(pa.array(order)).to_numpy(zero_copy_only=False)
    uni = values.astype(str) if values.size else np.empty(0, dtype="<U1")
    return IdMap(uni), rank


def _encode_labels(ctx: _Ctx, column: str) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.str_]]:
    """Codes into sorted distinct values for a low-cardinality text column (nulls -> "")."""
    arr = ctx.col(column)
    t = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        arr = arr.cast(pa.string())
    codes, dictionary = _dict_parts(arr)
    values = dictionary.cast(pa.string()).to_numpy(zero_copy_only=False).astype(str)
    if arr.null_count:
        # Nulls carry no code; they get the value "" (an explicit "unknown" bucket).
        valid = pc.is_valid(arr).to_numpy(zero_copy_only=False)
        codes = np.where(valid, codes, values.shape[0]).astype(np.int32)
        values = np.append(values, "")
    uniq, inverse = np.unique(values, return_inverse=True)
    return inverse.reshape(-1).astype(np.int32)[codes], uniq


def _encode_sessions(ctx: _Ctx, column: str) -> npt.NDArray[np.int64]:
    """An int64 code per session id (equal ids, equal codes, in order of first sight); null ->
    -1. Integer ids go through a compiled table (``build_kernels.FirstSeenCodes``): Arrow's
    dictionary encoding of 100M of them took 4.4 GB, the read's peak."""
    arr = ctx.col(column)
    if pa.types.is_integer(arr.type) and arr.type != pa.uint64():
        from retrieval.build_kernels import FirstSeenCodes  # numba: loaded by reads of sessions

        table, out, at = FirstSeenCodes(), np.empty(len(arr), np.int64), 0
        for chunk in arr.chunks:
            valid = pc.is_valid(chunk).to_numpy(zero_copy_only=False) if chunk.null_count else None
            values = pc.fill_null(chunk, 0).cast(pa.int64()).to_numpy()
            table.encode(values, valid, out[at : at + len(chunk)])
            at += len(chunk)
        return out
    codes, _ = _dict_parts(arr)
    out = codes.astype(np.int64)
    if arr.null_count:
        valid = pc.is_valid(arr).to_numpy(zero_copy_only=False)
        out[~valid] = -1
    return out


def _weights(ctx: _Ctx, column: str) -> npt.NDArray[np.float32]:
    arr = ctx.col(column)
    ctx.check_nulls(column, arr, "null weights")
    if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)):
        try:
            arr = arr.cast(pa.float64())
        except pa.ArrowException:
            bad = _first_failure(_combine(arr), lambda a: a.cast(pa.float64()))
            ctx.fail(column, bad, "has non-numeric weights")
    w = arr.to_numpy().astype(np.float64, copy=False)
    bad_rows = np.flatnonzero(~(np.isfinite(w) & (w >= 0)))
    if bad_rows.size:
        ctx.fail(
            column, int(bad_rows[0]), f"has {bad_rows.size} negative, NaN or infinite weight(s)"
        )
    return w.astype(np.float32)


# --------------------------------------------------------------------------------------------
# timestamps


def _timestamps(ctx: _Ctx, column: str) -> npt.NDArray[np.float64]:
    """Unix seconds from numbers, Arrow timestamps/dates or ISO-8601 text (no zone = UTC)."""
    arr = ctx.col(column)
    ctx.check_nulls(column, arr, "missing (null/empty) timestamps")
    t = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(t)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        ts = arr.to_numpy().astype(np.float64, copy=False)
    elif pa.types.is_timestamp(t) or pa.types.is_date(t):
        ts = _arrow_time_to_seconds(arr)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        ts = _parse_text_times(ctx, column, _combine(arr).cast(pa.string()))
    else:
        ctx.fail(column, 0, f"has type {t}; expected unix seconds or ISO-8601 text")
    bad = np.flatnonzero(~np.isfinite(ts))
    if bad.size:
        ctx.fail(column, int(bad[0]), "has unparsable (NaN or infinite) timestamps")
    return ts


def _arrow_time_to_seconds(arr: pa.ChunkedArray | pa.Array) -> npt.NDArray[np.float64]:
    if pa.types.is_date(arr.type):
        arr = arr.cast(pa.timestamp("s"))
    unit = arr.type.unit
    per_second = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[unit]
    raw = arr.cast(pa.int64()).to_numpy().astype(np.float64)
    return raw / per_second


def _parse_text_times(ctx: _Ctx, column: str, arr: pa.Array) -> npt.NDArray[np.float64]:
    """Numeric text as seconds; ISO-8601 with a zone offset or ``Z``; naive ISO-8601 as UTC."""
    out = np.empty(len(arr), dtype=np.float64)
    numeric = np.asarray(pc.match_substring_regex(arr, _NUMERIC))
    zoned = ~numeric & np.asarray(pc.match_substring_regex(arr, _ZONED))
    naive = ~numeric & ~zoned
    kinds: list[tuple[npt.NDArray[np.bool_], Callable[[pa.Array], pa.Array]]] = [
        (numeric, lambda a: pc.utf8_trim_whitespace(a).cast(pa.float64())),
        (zoned, lambda a: pc.utf8_trim_whitespace(a).cast(pa.timestamp("us", tz="UTC"))),
        (naive, lambda a: pc.utf8_trim_whitespace(a).cast(pa.timestamp("us"))),
    ]
    for mask, parse in kinds:
        if not mask.any():
            continue
        rows = np.flatnonzero(mask)
        sub = arr.filter(pa.array(mask)) if rows.size != len(arr) else arr
        try:
            parsed = parse(sub)
        except pa.ArrowException:
            bad = _first_failure(sub, parse)
            ctx.fail(
                column,
                int(rows[bad]),
                "has unparsable timestamps (expected unix seconds or ISO-8601 text like "
                "2024-01-31T12:00:00Z)",
            )
        if pa.types.is_floating(parsed.type):
            out[rows] = parsed.to_numpy(zero_copy_only=False)
        else:
            out[rows] = _arrow_time_to_seconds(parsed)
    return out


def _first_failure(arr: pa.Array, fn: Callable[[pa.Array], Any]) -> int:
    """Index of the first element ``fn`` rejects, by bisection (about 2n work, no row loop)."""
    lo, hi = 0, len(arr)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            fn(arr.slice(lo, mid - lo))
        except pa.ArrowException:
            hi = mid
        else:
            lo = mid
    return lo
