"""Build one source on a tiny CSV log the way `retrieval build` lays it out, for unit tests."""

from __future__ import annotations

from pathlib import Path

from retrieval.offline.events import read_events
from sources.base import Source, SourceContext, SourceParams


def build_source(
    tmp_path: Path,
    cls: type[Source],
    params: SourceParams,
    rows: list[str],
    header: str = "user_id,item_id,timestamp",
    name: str = "src",
) -> Source:
    log = tmp_path / f"{name}.csv"
    log.write_text(header + "\n" + "\n".join(rows) + "\n")
    events = read_events(log)
    root = tmp_path / f"{name}-build"
    (root / "ids").mkdir(parents=True)
    events.item_ids.save(root / "ids" / "items.npy")
    events.user_ids.save(root / "ids" / "users.npy")
    (root / name).mkdir()
    cls.build(events, root / name, params)
    return cls(name, params, SourceContext(artifacts=root))
