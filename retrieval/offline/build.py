"""Offline: turn an event log into one complete artifact directory, or leave the old one alone.

``--only NAME`` builds some sources and keeps the others (hard-linked, with their checksums).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from retrieval.artifacts import (
    ArtifactError,
    ArtifactWriter,
    Manifest,
    build_params_hash_input,
    file_sum,
    fingerprint,
    open_artifacts,
    verify_build,
)
from retrieval.config import RetrievalConfig, SourceConfig
from retrieval.errors import InputError
from retrieval.offline.events import EventLog, read_events
from retrieval.version import __version__

__all__ = [
    "BuildRow",
    "build",
    "format_summary",
    "needed_segments",
]

logger = logging.getLogger(__name__)
_ID_MAPS = ("ids/items.npy", "ids/users.npy")


@dataclasses.dataclass(frozen=True, slots=True)
class BuildRow:
    """One source built by this run (sources kept by ``--only`` have none): its wall time in
    seconds, its directory's size in bytes, and the stats its builder recorded in the
    manifest."""

    name: str
    kind: str
    seconds: float
    bytes_on_disk: int
    stats: dict[str, Any]


def needed_segments(config: RetrievalConfig) -> list[str]:
    """Segment columns the build must read: the config's and any a source asks for."""
    wanted = list(config.events.segments)
    for sc in config.sources:
        for seg in getattr(sc.resolved_params, "segments", None) or ():
            if seg not in wanted:
                wanted.append(seg)
    return wanted


def build(
    config: RetrievalConfig,
    events_path: Path,
    out_dir: Path,
    *,
    only: Sequence[str] | None = None,
    progress: bool | None = None,
    events: EventLog | None = None,
) -> list[BuildRow]:
    """Build every source that learns from data into ``out_dir`` (published atomically).

    With ``only``, just those sources are built; the other sources of the build already at
    ``out_dir`` are carried into the new one unchanged (checked, then hard-linked with their
    manifest entries), provided this log's id maps are byte for byte that build's: otherwise
    the dense ids of the kept sources would name other items, and the build is refused
    (ArtifactError) before anything is built. A previous build that cannot be read (older
    format, damaged) is refused too, rather than silently dropped.
    """
    learning = [sc for sc in config.sources if sc.source_class.learns()]
    if only:
        unknown = sorted(set(only) - {sc.name for sc in learning})
        if unknown:  # before the log is read: that can take minutes
            raise InputError(
                f"--only names {unknown}, but the sources that build are "
                f"{[sc.name for sc in learning]}"
            )
        learning = [sc for sc in learning if sc.name in only]
    show = sys.stderr.isatty() if progress is None else progress
    t0 = time.perf_counter()
    if events is None:  # only the columns the sources being built read
        reads = frozenset().union(*(sc.source_class.reads for sc in learning))
        segments = needed_segments(config) if "segments" in reads else []
        events = read_events(
            events_path, config.events.columns, segments, read_sessions="session_id" in reads
        )
    logger.info(
        "read %d events from %s in %.1fs", len(events), events_path, time.perf_counter() - t0
    )
    manifest = Manifest(
        package_version=__version__,
        input=fingerprint(events_path),
        counts={
            "events": len(events),
            "users": len(events.user_ids),
            "items": len(events.item_ids),
        },
    )
    rows: list[BuildRow] = []
    with ArtifactWriter(out_dir, manifest) as writer:
        ids_dir = writer.tmp / "ids"
        ids_dir.mkdir()
        events.item_ids.save(ids_dir / "items.npy")
        events.user_ids.save(ids_dir / "users.npy")
        if only:
            kept = _keep_others(writer, {sc.name for sc in learning})
            if kept:
                logger.info("kept %s from %s", ", ".join(kept), writer.previous)
        for i, sc in enumerate(learning):
            rows.append(_build_one(sc, events, writer.tmp, manifest, show))
            events = _without_unread(events, learning[i + 1 :])
    return rows


def _without_unread(events: EventLog, later: Sequence[SourceConfig]) -> EventLog:
    """The log without the columns no later builder reads (``Source.reads``): session ids are
    8 bytes an event, 0.8 GB at 100M events, that every later builder's peak would carry."""
    reads: frozenset[str] = frozenset().union(*(sc.source_class.reads for sc in later))
    drop: dict[str, Any] = {}
    if events.sessions is not None and "session_id" not in reads:
        drop["sessions"] = None
    if events.segments and "segments" not in reads:
        drop.update(segments={}, segment_values={})
    return dataclasses.replace(events, **drop) if drop else events


def _keep_others(writer: ArtifactWriter, building: set[str]) -> list[str]:
    """Carry every source of the published build but ``building`` into ``writer``'s build."""
    previous = writer.previous
    if previous is None:
        return []
    try:
        old = open_artifacts(previous, verify=False)
    except ArtifactError as exc:
        raise ArtifactError(
            f"--only cannot keep the other sources of {writer.out_dir}: {exc}. Build every "
            "source (no --only) to replace it"
        ) from exc
    names = sorted(set(old.sources) - building)
    if not names:
        return []
    for rel in _ID_MAPS:
        now, was = file_sum(writer.tmp / rel), old.files.get(rel)
        if was is None or was.sha256 != now.sha256:
            raise ArtifactError(
                f"--only {sorted(building)}: this event log gives another {rel} than the build "
                f"in {writer.out_dir} (sha256 {now.sha256}, that build's "
                f"{'none' if was is None else was.sha256}), so the sources kept from it "
                f"({', '.join(names)}) would name other items. Build every source (no --only), "
                f"or build from the log that build read ({old.input.get('path', 'unknown')})"
            )
    try:
        verify_build(previous, old, names)  # a damaged source is not carried into a new build
    except ArtifactError as exc:
        raise ArtifactError(
            f"--only cannot keep the other sources of {writer.out_dir}: {exc}. Build every "
            "source (no --only)"
        ) from exc
    for name in names:
        writer.carry_over(previous, name, old.sources[name])
    return names


def _build_one(
    sc: SourceConfig, events: EventLog, root: Path, manifest: Manifest, show: bool
) -> BuildRow:
    out = root / sc.name
    out.mkdir()
    t0 = time.perf_counter()
    with tqdm(
        total=len(events),
        desc=f"{sc.name} ({sc.kind})",
        unit="ev",
        unit_scale=True,
        disable=not show,
    ) as bar:
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            bar.update(max(n - done, 0))
            done = max(done, n)

        callback: Callable[[int], None] = tick
        stats = sc.source_class.build(events, out, sc.resolved_params, callback)
        bar.update(len(events) - done)
    seconds = time.perf_counter() - t0
    manifest.add_source(sc.name, sc.kind, build_params_hash_input(sc.resolved_params), stats)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return BuildRow(sc.name, sc.kind, seconds, size, dict(stats or {}))


def format_summary(rows: Sequence[BuildRow], n_events: int, n_items: int) -> str:
    """The table ``retrieval build`` prints: one line per source built, sizes in binary
    units. Its "rows" column is ``n_events``, the events each source was built from."""
    lines = [f"{'source':<16} {'kind':<14} {'rows':>12} {'items':>10} {'time':>9} {'on disk':>10}"]
    for r in rows:
        lines.append(
            f"{r.name:<16} {r.kind:<14} {n_events:>12,} {n_items:>10,} "
            f"{r.seconds:>8.1f}s {_size(r.bytes_on_disk):>10}"
        )
    return "\n".join(lines)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"
