"""``retrieval push``: upload built neighbour and popularity lists to Redis for artifact-less hosts.

Each source's rows go under a NEW version (``{p}:nb:{version}:{source}:{item}``, one packed row
per item, see ``retrieval.rows``); only when every row is written does one ``SET
{p}:nb:current:{source} {version}`` switch readers over, and then older versions of that source
are deleted. Readers fetch the current version and its rows in one atomic script, so they see the
old set or the new one, never a mix. Run one push per prefix at a time: a push deletes every
other version of the sources it uploads, including another push's unfinished one.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.artifacts import CSR, IdMap, load_csr, open_artifacts
from retrieval.build import check_built
from retrieval.config import RetrievalConfig
from retrieval.rows import pack_row
from retrieval.store import redact

__all__ = ["PUSHABLE_KINDS", "PushResult", "push"]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

PUSHABLE_KINDS = ("covisitation", "itemcf", "popularity")
_CHUNK = 2_000  # SETs per pipeline: big enough to hide the round trips, small enough to not stall


@dataclass(frozen=True)
class PushResult:
    source: str
    version: str
    rows: int
    bytes: int
    deleted: int
    seconds: float


def push(
    config: RetrievalConfig,
    artifacts: Path,
    url: str,
    *,
    prefix: str | None = None,
    only: Sequence[str] | None = None,
    timeout_s: float = 10.0,
) -> list[PushResult]:
    """Upload every pushable source (or ``only`` these) of ``config`` from ``artifacts``."""
    import redis

    prefix = prefix or config.store.prefix
    wanted = [sc for sc in config.sources if sc.kind in PUSHABLE_KINDS]
    if only:
        unknown = sorted(set(only) - {sc.name for sc in wanted})
        if unknown:
            raise ValueError(
                f"cannot push {unknown}: pushable sources are "
                f"{', '.join(sc.name for sc in wanted) or 'none'} (kinds {PUSHABLE_KINDS})"
            )
        wanted = [sc for sc in wanted if sc.name in only]
    if not wanted:
        raise ValueError(f"no source of kinds {PUSHABLE_KINDS} in the config: nothing to push")
    manifest = open_artifacts(artifacts)
    for sc in wanted:  # never publish lists built for another config
        check_built(manifest, sc)
    items = IdMap.load(Path(artifacts) / "ids" / "items.npy")
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    results = []
    try:
        for sc in wanted:
            t0 = time.perf_counter()
            rows = _rows_of(sc.kind, Path(artifacts) / sc.name, items)
            version = uuid.uuid4().hex[:16]
            n, size = _upload(client, prefix, sc.name, version, rows)
            client.set(f"{prefix}:nb:current:{sc.name}", version)  # the atomic switch
            deleted = _delete_other_versions(client, prefix, sc.name, version)
            results.append(PushResult(sc.name, version, n, size, deleted, time.perf_counter() - t0))
            logger.info("pushed %s version %s (%d rows) to %s", sc.name, version, n, redact(url))
    except redis.RedisError as exc:
        raise RuntimeError(f"push to {redact(url)} failed: {type(exc).__name__}") from None
    finally:
        client.close()
    return results


def _rows_of(kind: str, directory: Path, items: IdMap) -> Iterator[tuple[str, bytes]]:
    """(row key, packed row) for every non-empty row: an item's neighbours, or for popularity
    ``_global`` and ``<segment>=<value>`` lists."""
    csr = load_csr(directory)
    if kind == "popularity":
        names = {0: "_global"}
        segments: dict[str, dict[str, int]] = json.loads((directory / "segments.json").read_text())
        for seg, values in segments.items():
            names.update({int(row): f"{seg}={value}" for value, row in values.items()})
        for row, name in names.items():
            yield from _row(csr, row, name, items)
        return
    for row in np.flatnonzero(np.diff(csr.indptr)).tolist():
        yield from _row(csr, row, str(items.values[row]), items)


def _row(csr: CSR, row: int, key: str, items: IdMap) -> Iterator[tuple[str, bytes]]:
    dense, scores = csr.row(row)
    if dense.size:
        yield key, pack_row(items.to_external(np.asarray(dense)), np.asarray(scores))


def _upload(
    client: Any, prefix: str, source: str, version: str, rows: Iterator[tuple[str, bytes]]
) -> tuple[int, int]:
    n = size = 0
    pipe = client.pipeline(transaction=False)
    for key, blob in rows:
        pipe.set(f"{prefix}:nb:{version}:{source}:{key}", blob)
        n += 1
        size += len(blob)
        if n % _CHUNK == 0:
            pipe.execute()
    pipe.execute()
    return n, size


def _delete_other_versions(client: Any, prefix: str, source: str, keep: str) -> int:
    """Delete this source's rows of every version but ``keep`` (old pushes, failed ones)."""
    head = f"{prefix}:nb:".encode()
    tail = f":{source}:".encode()
    doomed: list[bytes] = []
    deleted = 0
    for key in client.scan_iter(match=f"{prefix}:nb:*:{source}:*", count=5_000):
        rest = key[len(head) :]
        version, sep, after = rest[:16], rest[16 : 16 + len(tail)], rest[16 + len(tail) :]
        if sep == tail and after and version != keep.encode():
            doomed.append(key)
        if len(doomed) >= _CHUNK:
            deleted += int(client.unlink(*doomed))
            doomed.clear()
    if doomed:
        deleted += int(client.unlink(*doomed))
    return deleted
