"""The second hop that fills k when a history's neighbourhood is short, local and remote, and
the blend's exclude_seen as the one place that drops history items."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from retrieval import Retriever
from retrieval.artifacts import CSR
from retrieval.config import load_config
from retrieval.offline.build import build
from retrieval.store.rows import Row
from retrieval.types import Deadline, Request
from sources.base import SourceContext
from sources.covisitation import CovisitationParams, CovisitationSource
from sources.itemcf import ItemCFParams, ItemCFSource
from sources.neighbours import RowReader, aggregate
from tests.builds import build_source


def csr_from(rows: dict[int, list[tuple[int, float]]]) -> CSR:
    n = max(max(rows), *(j for r in rows.values() for j, _ in r)) + 1
    indptr, idx, sc = [0], [], []
    for i in range(n):
        for j, s in rows.get(i, []):
            idx.append(j)
            sc.append(s)
        indptr.append(len(idx))
    return CSR(np.array(indptr, np.int64), np.array(idx, np.int32), np.array(sc, np.float32))


# 0's only neighbour is 1; 1's row reaches 3, 0 (history) and 2; 3's row is two hops away
GRAPH = csr_from({0: [(1, 2.0)], 1: [(3, 4.0), (0, 2.0), (2, 1.0)], 2: [(4, 1.0)], 3: [(5, 9.0)]})
HIST = np.array([0], np.int32)
ONE = np.ones(1, np.float32)


def test_second_hop_fills_k_below_every_first_hop_candidate():
    ids, sc = aggregate(GRAPH, HIST, ONE, 4, expand_decay=0.5)
    # first hop: 1 (2.0). Second: 1's row scaled to top 1 and weighted by 1's score 2.0:
    # 3 -> 2.0, 0 -> 1.0, 2 -> 0.5; the best new one scores 0.5 x the weakest first-hop
    # score (2.0), the others in proportion. 0 is history, a candidate like any other.
    assert ids.tolist() == [1, 3, 0, 2]
    assert sc.tolist() == pytest.approx([2.0, 1.0, 0.5, 0.25])
    # one hop only: 3's row (5) is never read; fewer than k when nothing more is reachable
    assert aggregate(GRAPH, HIST, ONE, 10, expand_decay=0.5)[0].tolist() == [1, 3, 0, 2]
    # a smaller k reads fewer rows; with one seed either way its list is a prefix here
    assert aggregate(GRAPH, HIST, ONE, 2, expand_decay=0.5)[0].tolist() == [1, 3]
    # even at decay 1 the second hop stays strictly below, and any decay > 0 ranks the same
    ids, sc = aggregate(GRAPH, HIST, ONE, 4, expand_decay=1.0)
    assert ids.tolist() == [1, 3, 0, 2]
    assert sc[1] < sc[0] and sc[1] == pytest.approx(2.0)
    assert aggregate(GRAPH, HIST, ONE, 4, expand_decay=0.01)[0].tolist() == [1, 3, 0, 2]


def test_second_hop_is_off_at_decay_zero_when_not_short_and_when_late():
    assert aggregate(GRAPH, HIST, ONE, 4, expand_decay=0.0)[0].tolist() == [1]
    assert aggregate(GRAPH, HIST, ONE, 1, expand_decay=0.5)[0].tolist() == [1]
    late = aggregate(GRAPH, HIST, ONE, 4, Deadline.in_ms(0.0), expand_decay=0.5)
    assert late[0].tolist() == [1]
    dropped = aggregate(GRAPH, HIST, ONE, 4, expand_decay=0.5, drop=np.array([3], np.int32))
    assert dropped[0].tolist() == [1, 0, 2]


def test_second_hop_follows_first_hop_strength_not_a_rows_raw_scale():
    # 1 is the stronger first-hop candidate; 2's row has far larger raw scores (a popular item)
    c = csr_from({0: [(1, 3.0), (2, 1.0)], 1: [(5, 1.0)], 2: [(6, 50.0)]})
    ids, sc = aggregate(c, HIST, ONE, 4, expand_decay=0.5)
    assert ids.tolist() == [1, 2, 5, 6]
    assert sc.tolist() == pytest.approx([3.0, 1.0, 0.5, 0.5 / 3])


CHAIN = ["1,10,0", "1,11,1", "2,11,0", "2,12,1", "3,11,0", "3,13,1", "4,12,0", "4,14,1"]


def test_covisitation_source_fills_k_from_a_real_build(tmp_path):
    # window 1: 10 -> {11}; 11 -> {10, 12, 13}; 12 -> {11, 14}
    p = CovisitationParams(window=1)
    src = build_source(tmp_path, CovisitationSource, p, CHAIN)
    ids, sc = src.retrieve(Request(history=(10,)), 4, Deadline.in_ms(1000))
    # first hop: 10 itself (self_weight 1 x its row's top 1.0) and 11 (1.0), tie by id;
    # second hop from 11: 12 and 13 at 0.5 x the weakest first-hop score
    assert ids.tolist() == [10, 11, 12, 13]
    assert sc.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.5])
    off = CovisitationSource("src", p.model_copy(update={"expand_decay": 0.0}), src.context)
    assert off.retrieve(Request(history=(10,)), 4, Deadline.in_ms(1000))[0].tolist() == [10, 11]


def test_itemcf_source_fills_k_from_a_real_build(tmp_path):
    src = build_source(tmp_path, ItemCFSource, ItemCFParams(), CHAIN)
    ids, sc = src.retrieve(Request(history=(10,)), 10, Deadline.in_ms(1000))
    off = ItemCFSource("src", ItemCFParams(expand_decay=0.0), src.context)
    one, one_sc = off.retrieve(Request(history=(10,)), 10, Deadline.in_ms(1000))
    assert one.tolist() == [10, 11]  # user 1 alone links 10: itself and 11
    assert ids[:2].tolist() == one.tolist() and np.allclose(sc[:2], one_sc)
    assert set(ids[2:].tolist()) == {12, 13} and np.all(sc[2:] < one_sc[-1])


class FakeRows:
    """A RowReader over in-memory rows; ``versions[i]`` answers the i-th read (the last one
    answers every later read), as if a push landed between two reads."""

    def __init__(self, versions: list[dict[str, Row]]) -> None:
        self.versions = versions
        self.reads: list[list[str]] = []

    def neighbour_rows(
        self, source: str, items: Sequence[str], *, timeout_ms: float | None = None
    ) -> list[Row | None] | None:
        rows = self.versions[min(len(self.reads), len(self.versions) - 1)]
        self.reads.append(list(items))
        return [rows.get(i) for i in items]


def pushed_rows(src: CovisitationSource) -> dict[str, Row]:
    """What `retrieval push` stores: every non-empty row, under external ids."""
    out = {}
    for row in np.flatnonzero(np.diff(src.csr.indptr)).tolist():
        dense, scores = src.csr.row(row)
        out[str(src.items.values[row])] = (src.items.to_external(dense), scores.copy())
    return out


def remote(params: CovisitationParams, reader: FakeRows) -> CovisitationSource:
    assert isinstance(reader, RowReader)
    p = params.model_copy(update={"backend": "redis"})
    return CovisitationSource("src", p, SourceContext(store=reader))  # type: ignore[arg-type]


@pytest.fixture
def chain_source(tmp_path: Path) -> CovisitationSource:
    return build_source(tmp_path, CovisitationSource, CovisitationParams(window=1), CHAIN)


def test_remote_second_hop_equals_local(chain_source):
    reader = FakeRows([pushed_rows(chain_source)])
    far = remote(chain_source.params, reader)  # type: ignore[arg-type]
    for hist, k in [((10,), 4), ((10,), 10), ((12, 10), 10), ((10, 999), 4)]:
        a = chain_source.retrieve(Request(history=hist), k, Deadline.in_ms(1000))
        b = far.retrieve(Request(history=hist), k, Deadline.in_ms(1000))
        assert a[0].tolist() == b[0].tolist()
        np.testing.assert_allclose(a[1], b[1], rtol=1e-6)
    # the second read re-reads the history rows with the seeds' rows
    reader.reads.clear()
    far.retrieve(Request(history=(10, 999)), 4, Deadline.in_ms(1000))
    assert reader.reads == [["10", "999"], ["10", "11"]]  # 999 has no row: not re-read


def test_remote_second_hop_is_skipped_when_a_push_lands_between_the_reads(chain_source):
    rows = pushed_rows(chain_source)
    newer = dict(rows)
    newer["10"] = (np.array([11, 14]), np.array([1.0, 0.5], np.float32))  # a changed row
    far = remote(chain_source.params, FakeRows([rows, newer]))  # type: ignore[arg-type]
    ids, _ = far.retrieve(Request(history=(10,)), 4, Deadline.in_ms(1000))
    assert ids.tolist() == [10, 11]  # the first build's first hop, nothing of the second
    # a push of rows equal for the history: the answer is the new build's own, in full
    same = dict(rows)
    same["11"] = (np.array([10, 13]), np.array([1.0, 1.0], np.float32))
    far = remote(chain_source.params, FakeRows([rows, same]))  # type: ignore[arg-type]
    assert far.retrieve(Request(history=(10,)), 4, Deadline.in_ms(1000))[0].tolist() == [
        10,
        11,
        13,
    ]


CONFIG = """
k: 10
deadline_ms: 2000
artifacts: build
blend: {{strategy: rrf, exclude_seen: {exclude_seen}}}
store: {{kind: memory}}
sources:
  - name: covisit
    kind: covisitation
    params: {{window: 2}}
  - name: itemcf
    kind: itemcf
    params: {{neighbours: 20}}
"""


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_blend_exclude_seen_is_the_one_place_history_items_are_dropped(tmp_path, exclude_seen):
    rng = np.random.default_rng(7)
    lines = ["user_id,item_id,timestamp"]
    for u in range(40):
        for t, i in enumerate(rng.choice(30, 6, replace=False)):
            lines.append(f"{u},{100 + int(i)},{1000 * u + t}")
    log = tmp_path / "log.csv"
    log.write_text("\n".join(lines) + "\n")
    cfg_path = tmp_path / "retrieval.yaml"
    cfg_path.write_text(textwrap.dedent(CONFIG.format(exclude_seen=str(exclude_seen).lower())))
    cfg = load_config(cfg_path)
    build(cfg, log, tmp_path / "build", progress=False)
    hist = (101, 105, 110)
    with Retriever(cfg) as r:
        for src in r.sources:  # both sources hand the history back...
            ids, _ = src.retrieve(Request(history=hist), 40, Deadline.in_ms(1000))
            assert set(hist) <= set(ids.tolist()), src.name
        res = r.blend(history=hist)
    got = set(res.item_ids.tolist())
    assert len(res) == 10
    if exclude_seen:  # ...and the blend drops it, still filling k
        assert not got & set(hist)
    else:
        assert got & set(hist)
