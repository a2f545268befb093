"""The recent-items source: recency x frequency x event weight over the request's own history."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.testing.contract import SourceContract
from retrieval.types import Deadline, Request
from sources.base import SkipSource, SourceContext
from sources.recent import RecentParams, RecentSource


def _recent(**params: object) -> RecentSource:
    return RecentSource("recent", RecentParams.model_validate(params), SourceContext())


def _get(source: RecentSource, request: Request, k: int = 10) -> tuple[list[object], np.ndarray]:
    ids, scores = source.retrieve(request, k, Deadline.in_ms(100))
    return ids.tolist(), scores


class TestRecentContract(SourceContract):
    def make_source(self, tmp_path):
        return _recent()

    def known_request(self):
        return Request(user_id=1, history=(1, 2, 3, 2))


def test_frequency_and_recency_by_hand():
    ids, scores = _get(_recent(recency_decay=0.9), Request(history=(1, 2, 1, 3)))
    # weights oldest -> newest: .729, .81, .9, 1.0; item 1 was seen twice: .729 + .9
    assert ids == [1, 3, 2]
    np.testing.assert_allclose(scores, [1.629, 1.0, 0.81], rtol=1e-6)


def test_event_weights_lift_an_order_above_a_later_click():
    req = Request(history=(5, 6), history_event_types=("order", "click"))
    ids, _ = _get(_recent(), req)
    assert ids == [5, 6]
    ids, _ = _get(_recent(event_weights={}), req)
    assert ids == [6, 5]


def test_ties_go_to_the_item_seen_last():
    ids, _ = _get(_recent(recency_decay=1.0), Request(history=(1, 2, 3)))
    assert ids == [3, 2, 1]


def test_history_window_and_k():
    req = Request(history=tuple(range(100)))
    ids, _ = _get(_recent(history=5), req, k=3)
    assert ids == [99, 98, 97]


def test_seed_items_are_not_returned_and_alone_skip():
    ids, _ = _get(_recent(), Request(history=(1, 2, 3), seed_items=(3,)))
    assert ids == [2, 1]
    with pytest.raises(SkipSource):
        _recent().retrieve(Request(seed_items=(3,)), 10, Deadline.in_ms(100))


def test_string_ids_round_trip():
    ids, scores = _get(_recent(), Request(history=("a", "b", "a")))
    assert ids == ["a", "b"]
    assert scores.dtype == np.float32
