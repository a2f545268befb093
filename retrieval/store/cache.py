"""The blend result cache: keys and a compact, pickle-free encoding of a ``CandidateSet``.

A value is ``b"CRCS"``, a format byte, a u32 header length, a JSON header (counts, dtypes,
source names, reports) and then the raw little-endian arrays: ids (int64 or UTF-32 text),
float32 scores and the int32 rank matrix. Decoding checks every length, so a foreign or cut value
is a miss, never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

from retrieval.errors import StoreError
from retrieval.types import CandidateSet, Request, SourceReport, SourceStatus

__all__ = ["CacheFormatError", "cache_key", "decode_result", "encode_result"]

_MAGIC = b"CRCS"
_VERSION = 1
_HEAD = struct.Struct("<4sBI")


class CacheFormatError(StoreError, ValueError):
    """Bytes that are not a cached result of this format."""


def cache_key(request: Request, k: int, version: str) -> str:
    """A digest of everything the blend's answer depends on: user, request shape, history
    (with types and stamps, which weight it) and the artifact/config ``version``."""
    shape = [
        version,
        repr(request.user_id),
        k,
        sorted(map(str, request.context.items())),
        sorted(map(repr, request.exclude)),
        [repr(x) for x in request.seed_items],
        [repr(x) for x in request.history],
        list(request.history_event_types or ()),
        list(request.history_timestamps or ()),
        None if request.vector is None else np.asarray(request.vector).tobytes().hex(),
    ]
    blob = json.dumps(shape, separators=(",", ":")).encode("utf-8")
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def encode_result(result: CandidateSet) -> bytes:
    """``result`` as one cache value (the layout above): no pickle, so a value another
    process or a foreign writer put at the key can never run code when read. ``store_status``
    and ``cache_hit`` are not kept: they describe the request that reads the value."""
    ids = result.item_ids
    ids_le = ids.astype("<i8") if ids.dtype.kind in "iu" else ids.astype(str)
    ids_le = ids_le.astype(ids_le.dtype.newbyteorder("<"))
    header = {
        "n": len(result),
        "ids": ids_le.dtype.str,
        "sources": list(result.source_names),
        "reports": [r.to_dict() for r in result.reports],
        "backfilled": result.backfilled,
        "elapsed_ms": result.elapsed_ms,
    }
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return b"".join(
        (
            _HEAD.pack(_MAGIC, _VERSION, len(head)),
            head,
            ids_le.tobytes(),
            result.scores.astype("<f4").tobytes(),
            result.ranks.astype("<i4").tobytes(),
        )
    )


def decode_result(blob: bytes) -> CandidateSet:
    """The ``CandidateSet`` an :func:`encode_result` value holds. Anything else (another
    format version, a cut or foreign value) raises :class:`CacheFormatError` and nothing
    else, so the caller treats it as a miss."""
    try:
        return _decode(blob)
    except CacheFormatError:
        raise
    except (ValueError, TypeError, KeyError, struct.error) as exc:
        raise CacheFormatError(f"not a cached result: {exc}") from None


def _decode(blob: bytes) -> CandidateSet:
    magic, version, n_head = _HEAD.unpack_from(blob)
    if magic != _MAGIC or version != _VERSION:
        raise CacheFormatError(f"magic {magic!r} version {version}")
    pos = _HEAD.size
    header: dict[str, Any] = json.loads(blob[pos : pos + n_head])
    pos += n_head
    n, names = int(header["n"]), tuple(str(s) for s in header["sources"])
    id_dtype = np.dtype(header["ids"])
    if id_dtype.kind not in "iU" or (id_dtype.kind == "i" and id_dtype.itemsize != 8):
        raise CacheFormatError(f"id dtype {id_dtype}")
    sizes = (n * id_dtype.itemsize, 4 * n, 4 * n * len(names))
    if len(blob) != pos + sum(sizes):
        raise CacheFormatError(f"{len(blob)} bytes, expected {pos + sum(sizes)}")
    ids = np.frombuffer(blob, dtype=id_dtype, count=n, offset=pos)
    pos += sizes[0]
    scores = np.frombuffer(blob, dtype="<f4", count=n, offset=pos)
    pos += sizes[1]
    ranks = np.frombuffer(blob, dtype="<i4", count=n * len(names), offset=pos)
    reports = tuple(
        SourceReport(
            name=str(r["name"]),
            status=SourceStatus(r["status"]),
            latency_ms=float(r["latency_ms"]),
            returned=int(r["returned"]),
            survived=int(r["survived"]),
            error=r["error"],
        )
        for r in header["reports"]
    )
    return CandidateSet(
        item_ids=ids.astype(np.int64) if id_dtype.kind == "i" else ids.astype(str),
        scores=scores.astype(np.float32),
        source_names=names,
        ranks=ranks.astype(np.int32).reshape(n, len(names)),
        reports=reports,
        elapsed_ms=float(header["elapsed_ms"]),
        backfilled=int(header["backfilled"]),
    )
