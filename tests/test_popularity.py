"""Popularity: decayed and trending counts, per-segment lists, live counts from the store."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.artifacts import ArtifactError
from retrieval.offline.events import EventLog, read_events
from retrieval.testing.contract import SourceContract
from retrieval.types import Deadline, Request
from sources.base import SourceContext
from sources.popularity import PopularityParams, PopularitySource

DAY = 86_400.0
T0 = 1_700_000_000.0


def write_events(path: Path, rows: list[tuple[Any, ...]]) -> EventLog:
    """rows: (user, item, timestamp, event_type, country)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp", "event_type", "country"])
        w.writerows(rows)
    return read_events(path, segments=["country"])


def build(tmp_path: Path, events: EventLog, **params: Any) -> tuple[Path, PopularityParams]:
    root = tmp_path / "build"
    (root / "ids").mkdir(parents=True, exist_ok=True)
    events.item_ids.save(root / "ids" / "items.npy")
    events.user_ids.save(root / "ids" / "users.npy")
    p = PopularityParams.model_validate(params)
    PopularitySource.build(events, root / "pop", p)
    return root, p


def open_source(root: Path, p: PopularityParams):
    return PopularitySource("pop", p, SourceContext(artifacts=root))


def get(source: PopularitySource, k: int = 10, **req: Any) -> tuple[list[Any], np.ndarray]:
    ids, scores = source.retrieve(Request(**req), k, Deadline.in_ms(100))
    return ids.tolist(), scores


@pytest.fixture
def shop(tmp_path):
    """'old' heavy 28 days ago, 'new' light now, 'mid' an order 7 days ago; de vs fr items."""
    rows = [("u1", "old", T0 - 28 * DAY, "click", "fr")] * 10
    rows += [("u2", "new", T0, "click", "de"), ("u3", "mid", T0 - 7 * DAY, "order", "de")]
    rows += [(f"d{i}", "de_hit", T0 - 1, "click", "de") for i in range(3)]
    rows += [(f"f{i}", "fr_hit", T0 - 1, "click", "fr") for i in range(4)]
    return write_events(tmp_path / "events.csv", rows)


class TestPopularityContract(SourceContract):
    def make_source(self, tmp_path):
        rows = [(f"u{i % 7}", i % 40, T0 + i, "click", "de") for i in range(200)]
        events = write_events(tmp_path / "e.csv", rows)
        root, p = build(tmp_path, events, segments=["country"])
        return open_source(root, p)

    def known_request(self):
        return Request(user_id="u1", context={"country": "de"})


def test_decay_by_hand(shop, tmp_path):
    root, p = build(tmp_path, shop, half_life_days=7.0)
    ids, scores = get(open_source(root, p))
    # fr_hit 4; mid: 6 * 2^-1 = 3; de_hit 3 (1 s old); new 1; old 10 * 2^-4 = 0.625
    assert ids == ["fr_hit", "mid", "de_hit", "new", "old"]  # de_hit is 1 s older
    np.testing.assert_allclose(scores, [4, 3, 3, 1, 0.625], rtol=1e-4)


def test_segments_pick_a_list_and_unknown_values_fall_back(shop, tmp_path):
    root, p = build(tmp_path, shop, segments=["country"])
    source = open_source(root, p)
    de, de_scores = get(source, context={"country": "de"})
    assert de[:3] == ["mid", "de_hit", "new"]
    # the short de list is backfilled from the global list, scored strictly below it
    assert set(de[3:]) == {"fr_hit", "old"} and de_scores[3] < de_scores[2]
    assert np.all(np.diff(de_scores) <= 0)
    assert get(source, context={"country": "fr"})[0][:2] == ["fr_hit", "old"]
    glob = get(source)[0]
    assert get(source, context={"country": "nowhere"})[0] == glob
    assert get(source, user_id="never-seen", context={"city": "x"})[0] == glob


def test_events_without_a_segment_code_count_only_globally(shop, tmp_path):
    """A log built by hand may mark "no value" with code -1 (``read_events`` maps nulls to "")."""
    codes = shop.segments["country"].copy()
    fr = int(np.flatnonzero(shop.segment_values["country"] == "fr")[0])
    codes[codes == fr] = -1
    events = dataclasses.replace(shop, segments={"country": codes})
    root, p = build(tmp_path, events, segments=["country"])
    source = open_source(root, p)
    glob = get(source)[0]
    assert glob[:2] == ["fr_hit", "mid"]  # the fr events still count in the global list
    assert get(source, context={"country": "fr"})[0] == glob  # an empty fr list: all backfill
    assert get(source, context={"country": "de"})[0][:3] == ["mid", "de_hit", "new"]


def test_trending_ranks_a_rising_item_above_a_steady_one(tmp_path):
    rows = []
    for day in range(15):  # steady: 3 a day; rising: 1 a day, then 10 on the last day
        t = T0 - day * DAY - 60
        rows += [(f"s{day}_{j}", 1, t, "click", "de") for j in range(3)]
        rows += [(f"r{day}", 2, t, "click", "de")]
    rows += [(f"rr{j}", 2, T0, "click", "de") for j in range(9)]
    rows += [("x", 3, T0 - 20 * DAY, "click", "de")]  # no recent activity: not trending
    events = write_events(tmp_path / "e.csv", rows)
    root, p = build(tmp_path, events, mode="trending")
    ids, scores = get(open_source(root, p))
    assert ids == [2, 1]
    assert scores[0] > 2 * scores[1]
    root2, p2 = build(tmp_path / "b", events, mode="decayed", half_life_days=30)
    assert get(open_source(root2, p2))[0][0] == 1  # by plain volume the steady item wins


def test_integer_ids_round_trip_and_top_n(tmp_path):
    rows = [(f"u{i}", 10_000_000_000 + i % 5, T0 - i, "click", "de") for i in range(50)]
    events = write_events(tmp_path / "e.csv", rows)
    root, p = build(tmp_path, events, top_n=3)
    ids, scores = open_source(root, p).retrieve(Request(), 10, Deadline.in_ms(100))
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    assert ids.tolist() == [10_000_000_000, 10_000_000_001, 10_000_000_002]


def test_live_counts_change_the_ranking(shop, tmp_path):
    root, p = build(tmp_path, shop, segments=["country"])
    live = {None: (["old", "brand_new"], [50.0, 10.0]), "country=de": (["new"], [9.0])}
    source = open_source(root, p)
    ids, scores = get(source, live_popular=live)
    assert ids[:2] == ["old", "brand_new"]  # items the build never saw can appear too
    assert scores[0] == pytest.approx(50.625, rel=1e-4)
    assert get(source, context={"country": "de"}, live_popular=live)[0][0] == "new"
    # the retriever asks for exactly the list the source will read, no deeper than live_top
    assert source.live_popular(Request(context={"country": "de"}), 500) == (("country=de",), 100)
    assert source.live_popular(Request(context={"country": "xx"}), 10) == ((None,), 10)
    muted = open_source(root, p.model_copy(update={"live_weight": 0.0}))
    assert get(muted, live_popular=live)[0][0] == "fr_hit"
    assert muted.live_popular(Request(), 10) == ((), 0)


def test_no_or_failed_store_read_serves_the_build(shop, tmp_path):
    root, p = build(tmp_path, shop)
    source = open_source(root, p)
    assert get(source)[0][0] == "fr_hit"  # live_popular None: the store was not read
    assert get(source, live_popular={})[0][0] == "fr_hit"  # the read failed
    bad = {None: ([1.5, None], [1.0, 2.0])}  # garbage never breaks the fallback
    assert get(source, live_popular=bad)[0][0] == "fr_hit"


def test_unknown_segment_column_is_a_build_error(shop, tmp_path):
    with pytest.raises(ValueError, match="city"):
        build(tmp_path, shop, segments=["city"])


def test_missing_artifacts_are_artifact_errors(tmp_path):
    p = PopularityParams()
    with pytest.raises(ArtifactError):
        PopularitySource("pop", p, SourceContext(artifacts=None))
    with pytest.raises(ArtifactError):
        PopularitySource("pop", p, SourceContext(artifacts=tmp_path))


def test_a_segments_file_of_the_wrong_shape_is_an_artifact_error(shop, tmp_path):
    """A list where a mapping belongs used to escape as an AttributeError traceback."""
    root, p = build(tmp_path, shop, segments=["country"])
    (root / "pop" / "segments.json").write_text('["country"]')
    with pytest.raises(ArtifactError, match=r"segments\.json.*expected"):
        open_source(root, p)
