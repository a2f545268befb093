"""The packed binary layout of one ranked list (an item's neighbour row) in Redis.

``retrieval push`` writes it and the Redis backend of the neighbour sources reads it; it imports
nothing else of ours. Little-endian, validated before use::

    header   12 bytes  b"CRNR", format version (u8), id kind (u8: 1 int64, 2 utf-8), 0 (u16),
                       count (u32)
    kind 1   count x int64 external ids, then count x float32 scores
    kind 2   count x float32 scores, then the utf-8 ids joined by NUL

Rows hold external ids, not dense ones: a serving host then needs no id map (10M ids are 80 MB
of int64, far more as strings, to reload at every push), for 4 more bytes per integer neighbour.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.errors import StoreError

__all__ = ["ROW_FORMAT_VERSION", "Row", "RowFormatError", "pack_row", "unpack_row"]

ROW_FORMAT_VERSION = 1
_MAGIC = b"CRNR"
_HEADER = struct.Struct("<4sBBHI")
_INT, _STR = 1, 2

Row = tuple[npt.NDArray[Any], npt.NDArray[np.float32]]


class RowFormatError(StoreError, ValueError):
    """A value that is not a row of this format version (foreign, truncated or corrupted)."""


def pack_row(ids: npt.NDArray[Any], scores: npt.NDArray[Any]) -> bytes:
    """One row's bytes: ``ids`` int64 or str, ``scores`` cast to float32."""
    ids = np.asarray(ids)
    scores = np.asarray(scores, dtype="<f4")
    if ids.shape != scores.shape or ids.ndim != 1:
        raise ValueError(f"ids {ids.shape} and scores {scores.shape} must be equal 1-D shapes")
    n = int(ids.shape[0])
    if ids.dtype.kind in "iu":
        head = _HEADER.pack(_MAGIC, ROW_FORMAT_VERSION, _INT, 0, n)
        return head + ids.astype("<i8").tobytes() + scores.tobytes()
    text = [str(x) for x in ids.tolist()]
    if any("\x00" in t for t in text):
        raise ValueError("string ids must not contain NUL")
    head = _HEADER.pack(_MAGIC, ROW_FORMAT_VERSION, _STR, 0, n)
    return head + scores.tobytes() + "\x00".join(text).encode("utf-8")


def unpack_row(blob: bytes) -> Row:
    """Ids (int64 or str) and float32 scores; RowFormatError unless the value is well formed."""
    if not isinstance(blob, bytes | bytearray | memoryview) or len(blob) < _HEADER.size:
        raise RowFormatError(f"not a row: {bytes(blob[:16]) if blob else blob!r}")
    magic, version, kind, _, n = _HEADER.unpack_from(blob)
    if magic != _MAGIC:
        raise RowFormatError(f"bad magic {magic!r}")
    if version != ROW_FORMAT_VERSION:
        raise RowFormatError(f"row format version {version}, this code reads {ROW_FORMAT_VERSION}")
    body = memoryview(blob)[_HEADER.size :]
    if kind == _INT:
        if len(body) != 12 * n:
            raise RowFormatError(f"{n} int rows need {12 * n} bytes, found {len(body)}")
        ids: npt.NDArray[Any] = np.frombuffer(body, dtype="<i8", count=n)  # read-only views
        scores = np.frombuffer(body, dtype="<f4", count=n, offset=8 * n)
    elif kind == _STR:
        if len(body) < 4 * n:
            raise RowFormatError(f"{n} string rows need at least {4 * n} bytes")
        scores = np.frombuffer(body, dtype="<f4", count=n)
        try:
            text = bytes(body[4 * n :]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RowFormatError(f"ids are not utf-8: {exc}") from None
        parts = text.split("\x00") if n else []
        if len(parts) != n or (n == 0 and text):
            raise RowFormatError(f"header says {n} ids, found {len(parts)}")
        ids = np.asarray(parts, dtype=str) if n else np.empty(0, dtype=np.int64)
    else:
        raise RowFormatError(f"unknown id kind {kind}")
    if not np.isfinite(scores).all():
        raise RowFormatError("non-finite scores")
    return ids, scores
