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
    """Pytest mixin: the tests every source must pass, the built-in ones and yours.

        class TestMySource(SourceContract):
            def make_source(self, tmp_path): return MySource("m", MyParams(), SourceContext())
            def known_request(self): return Request(user_id=1, history=(1, 2, 3))

    Name the subclass ``Test...`` so pytest collects it (the mixin itself is not collected).
    Each test gets a fresh source and calls ``retrieve`` directly, asking for ``k`` candidates
    (override ``k`` to test another depth); ``SkipSource`` counts as an empty answer, any other
    exception fails the test. The blender checks answers too, but there a broken source is only
    an ``error`` in a report; here it fails where you can see why.
    """

    k = 25

    def make_source(self, tmp_path) -> Source:  # pragma: no cover - abstract
        """Your source, ready to serve :meth:`known_request`. Build any artifacts it needs
        under ``tmp_path`` (pytest's per-test directory). Called once per test."""
        raise NotImplementedError

    def known_request(self) -> Request:  # pragma: no cover - abstract
        """A request your source can answer with at least one candidate: the tests that need a
        real answer use it, and an empty answer to it fails."""
        raise NotImplementedError

    @pytest.fixture
    def source(self, tmp_path):
        """The source under test, from :meth:`make_source`; closed after the test, whether it
        passed or failed."""
        s = self.make_source(tmp_path)
        yield s
        s.close()

    def _call(self, source: Source, request: Request, k: int, ms: float = 1000.0):
        try:
            return source.retrieve(request, k, Deadline.in_ms(ms))
        except SkipSource:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)

    def test_at_most_k_unique_ids_sorted_by_score(self, source):
        """The answer's shape the merge relies on: two 1-D arrays of one length, between 1 and
        ``k`` ids, each once, finite scores that never rise (best first; ties allowed)."""
        ids, scores = self._call(source, self.known_request(), self.k)
        ids, scores = np.asarray(ids), np.asarray(scores)
        assert ids.ndim == 1 and ids.shape == scores.shape
        assert 0 < ids.size <= self.k, "a known request should get some candidates"
        assert np.unique(ids).size == ids.size
        assert np.all(np.diff(scores.astype(np.float64)) <= 1e-6)
        assert np.all(np.isfinite(scores))

    def test_small_k(self, source):
        """``k=1`` gets at most one id: a source cuts its own list to ``k`` (the blender asks
        each source for exactly the depth it can use)."""
        ids, _ = self._call(source, self.known_request(), 1)
        assert np.asarray(ids).size <= 1

    def test_respects_an_expired_deadline(self, source):
        """With a deadline already passed, the source returns (at most ``k`` ids, or skips)
        promptly instead of raising or running its whole search: the blender abandons a late
        answer, but a source that ignores the deadline still holds its lane's thread."""
        t0 = time.monotonic()
        ids, _ = self._call(source, self.known_request(), self.k, ms=0.001)
        assert np.asarray(ids).size <= self.k
        assert time.monotonic() - t0 < 1.0  # generous: a shared, noisy machine

    def test_tolerates_unknown_user_and_items(self, source):
        """A user, history items (a string and an int id) and a segment value the source has
        never seen give a short answer, an empty one or ``SkipSource``, never an error: live
        traffic always carries ids newer than the build."""
        req = Request(
            user_id="no-such-user-\u2603",
            history=("no-such-item", 987_654_321_987),
            context={"country": "nowhere"},
        )
        ids, _scores = self._call(source, req, self.k)
        assert np.asarray(ids).size <= self.k

    def test_never_mutates_the_request(self, source):
        """History, context, exclusions, seed items and vector are unchanged after the call:
        the blender hands the same request to every source at once, on their own threads."""
        req = self.known_request()
        before = copy.deepcopy(req)
        self._call(source, req, self.k)
        assert req.history == before.history
        assert dict(req.context) == dict(before.context)
        assert req.exclude == before.exclude
        assert req.seed_items == before.seed_items
        if req.vector is not None:
            assert np.array_equal(req.vector, before.vector)
