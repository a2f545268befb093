"""``retrieval push``: upload built neighbour lists (co-visitation, item-CF) to Redis, for hosts
that serve those sources with ``backend: redis`` and no local artifacts.

Only neighbour lists are pushed. Popularity lists are not: nothing reads them from Redis (the
popularity source serves its build from local artifacts, plus the live counters the store keeps
from ``record()``), so pushing them would only fill Redis.

Each source's rows go under a NEW version (``{p}:nb:{version}:{source}:{item}``, one packed row
per item, see ``retrieval.store.rows``); when every row is written, a marker (the row key of
the empty item, ``{p}:nb:{version}:{source}:``) says the version is whole, and one ``SET
{p}:nb:current:{source} {version}`` switches readers over; then older versions of that source are
deleted. Readers fetch the current version and its rows in one atomic script, so they see the old
set or the new one, never a mix; a current version without marker and rows is reported as
missing. Run one push per prefix at a time: a push deletes every other version of the sources it
uploads, including another push's unfinished one.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.artifacts import CSR, IdMap, check_built, load_csr, open_artifacts, resolve_build
from retrieval.config import RetrievalConfig
from retrieval.errors import InputError, StoreError
from retrieval.redact import redact
from retrieval.store.rows import pack_row

__all__ = ["PUSHABLE_KINDS", "PushResult", "push"]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

PUSHABLE_KINDS = ("covisitation", "itemcf")  # popularity is served locally: never pushed
_CHUNK = 2_000  # SETs per pipeline: big enough to hide the round trips, small enough to not stall


@dataclass(frozen=True)
class PushResult:
    """One source's push: ``version`` is the one readers now see (the key to look for when
    checking Redis by hand); ``rows`` packed rows of ``bytes`` bytes in all (values only, not
    Redis's overhead); ``deleted`` keys of older versions removed; ``seconds`` of wall time."""

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
    """Upload every neighbour source (or ``only`` these) of ``config`` from ``artifacts``.

    Popularity sources are never pushed (see the module docstring); naming one in ``only`` is
    an error that says so.
    """
    import redis

    prefix = prefix or config.store.prefix
    wanted = [sc for sc in config.sources if sc.kind in PUSHABLE_KINDS]
    if only:
        unknown = sorted(set(only) - {sc.name for sc in wanted})
        if unknown:
            local = sorted(set(unknown) & {sc.name for sc in config.sources})
            why = (
                f" ({', '.join(local)}: only neighbour lists are pushed; popularity and other "
                "kinds serve from local artifacts)"
                if local
                else ""
            )
            raise InputError(
                f"cannot push {unknown}: pushable sources are "
                f"{', '.join(sc.name for sc in wanted) or 'none'} (kinds {PUSHABLE_KINDS}){why}"
            )
        wanted = [sc for sc in wanted if sc.name in only]
    if not wanted:
        raise InputError(f"no source of kinds {PUSHABLE_KINDS} in the config: nothing to push")
    artifacts = resolve_build(Path(artifacts))  # one build throughout, even if one is published
    manifest = open_artifacts(artifacts)
    for sc in wanted:  # never publish lists built for another config
        check_built(manifest, sc)
    items = IdMap.load(Path(artifacts) / "ids" / "items.npy")
    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    results = []
    try:
        for sc in wanted:
            t0 = time.perf_counter()
            rows = _rows_of(Path(artifacts) / sc.name, items)
            version = uuid.uuid4().hex[:16]
            n, size = _upload(client, prefix, sc.name, version, rows)
            client.set(f"{prefix}:nb:{version}:{sc.name}:", str(n))  # the marker: all written
            client.set(f"{prefix}:nb:current:{sc.name}", version)  # the atomic switch
            deleted = _delete_other_versions(client, prefix, sc.name, version)
            results.append(PushResult(sc.name, version, n, size, deleted, time.perf_counter() - t0))
            logger.info("pushed %s version %s (%d rows) to %s", sc.name, version, n, redact(url))
    except redis.RedisError as exc:
        raise StoreError(f"push to {redact(url)} failed: {type(exc).__name__}") from None
    finally:
        client.close()
    return results


def _rows_of(directory: Path, items: IdMap) -> Iterator[tuple[str, bytes]]:
    """(row key, packed row) for every non-empty row: an item's neighbours."""
    csr = load_csr(directory)
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
    """Delete this source's rows and markers of every version but ``keep`` (old pushes, failed
    ones)."""
    head = f"{prefix}:nb:".encode()
    tail = f":{source}:".encode()
    doomed: list[bytes] = []
    deleted = 0
    for key in client.scan_iter(match=f"{prefix}:nb:*:{source}:*", count=5_000):
        rest = key[len(head) :]
        version, sep = rest[:16], rest[16 : 16 + len(tail)]
        if sep == tail and version != keep.encode():  # an item's row, or the version's marker
            doomed.append(key)
        if len(doomed) >= _CHUNK:
            deleted += int(client.unlink(*doomed))
            doomed.clear()
    if doomed:
        deleted += int(client.unlink(*doomed))
    return deleted
