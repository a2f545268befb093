"""The contract every source passes, built-in or user-defined.

Subclass ``SourceContract``, implement ``make_source(tmp_path)`` and ``known_request()`` (a
request the source can serve), and the shared tests run against it.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest

from retrieval.types import Deadline, Request
from sources.base import SkipSource, Source


class SourceContract:
    k = 25

    def make_source(self, tmp_path) -> Source:  # pragma: no cover - abstract
        raise NotImplementedError

    def known_request(self) -> Request:  # pragma: no cover - abstract
        raise NotImplementedError

    @pytest.fixture
    def source(self, tmp_path):
        s = self.make_source(tmp_path)
        yield s
        s.close()

    def _call(self, source: Source, request: Request, k: int, ms: float = 1000.0):
        try:
            return source.retrieve(request, k, Deadline.in_ms(ms))
        except SkipSource:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)

    def test_at_most_k_unique_ids_sorted_by_score(self, source):
        ids, scores = self._call(source, self.known_request(), self.k)
        ids, scores = np.asarray(ids), np.asarray(scores)
        assert ids.ndim == 1 and ids.shape == scores.shape
        assert 0 < ids.size <= self.k, "a known request should get some candidates"
        assert np.unique(ids).size == ids.size
        assert np.all(np.diff(scores.astype(np.float64)) <= 1e-6)
        assert np.all(np.isfinite(scores))

    def test_small_k(self, source):
        ids, _ = self._call(source, self.known_request(), 1)
        assert np.asarray(ids).size <= 1

    def test_respects_an_expired_deadline(self, source):
        t0 = time.monotonic()
        ids, _ = self._call(source, self.known_request(), self.k, ms=0.001)
        assert np.asarray(ids).size <= self.k
        assert time.monotonic() - t0 < 1.0  # generous: a shared, noisy machine

    def test_tolerates_unknown_user_and_items(self, source):
        req = Request(
            user_id="no-such-user-\u2603",
            history=("no-such-item", 987_654_321_987),
            context={"country": "nowhere"},
        )
        ids, _scores = self._call(source, req, self.k)
        assert np.asarray(ids).size <= self.k

    def test_never_mutates_the_request(self, source):
        req = self.known_request()
        before = copy.deepcopy(req)
        self._call(source, req, self.k)
        assert req.history == before.history
        assert dict(req.context) == dict(before.context)
        assert req.exclude == before.exclude
        assert req.seed_items == before.seed_items
        if req.vector is not None:
            assert np.array_equal(req.vector, before.vector)
