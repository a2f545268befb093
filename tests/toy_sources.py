"""Small sources defined for the tests: fixed lists, slow ones, failing ones."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from pydantic import Field

from retrieval.types import Deadline, Request
from sources.base import Need, Ranked, SkipSource, Source, SourceContext, SourceParams


class ListParams(SourceParams):
    items: list[Any] = Field(default_factory=list)
    scores: list[float] | None = None
    delay_ms: float = 0.0
    fail: bool = False
    skip: bool = False


class ListSource(Source):
    """Returns its configured list (best first), honouring k; can be slow, fail or skip."""

    Params = ListParams

    def __init__(self, name: str, params: SourceParams, context: SourceContext) -> None:
        super().__init__(name, params, context)
        assert isinstance(params, ListParams)
        self.p = params
        self.calls = 0
        self._lock = threading.Lock()
        self.fail = params.fail

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        with self._lock:
            self.calls += 1
        if self.p.delay_ms:
            time.sleep(self.p.delay_ms / 1000)
        if self.fail:
            raise RuntimeError(f"{self.name} exploded")
        if self.p.skip:
            raise SkipSource("nothing to go on")
        ids = np.asarray(self.p.items)
        n = len(ids)
        scores = (
            np.asarray(self.p.scores, dtype=np.float32)
            if self.p.scores is not None
            else np.linspace(1.0, 0.5, n, dtype=np.float32)
            if n
            else np.empty(0, np.float32)
        )
        return ids[:k], scores[:k]


class HistoryEcho(Source):
    """Needs history; returns the history's items shifted by 1000 (a stand-in neighbour list)."""

    needs = frozenset({Need.HISTORY})

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        known = [h for h in reversed(request.history) if isinstance(h, int) and h < 10**9]
        ids = np.asarray([h + 1000 for h in known][:k], dtype=np.int64)
        return ids, np.linspace(1.0, 0.1, ids.size, dtype=np.float32)


class RequestLog(ListSource):
    """A ``ListSource`` that keeps every request it was asked (the warm-up's among them)."""

    def __init__(self, name: str, params: SourceParams, context: SourceContext) -> None:
        super().__init__(name, params, context)
        self.requests: list[Request] = []

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        self.requests.append(request)
        return super().retrieve(request, k, deadline)


class CatalogSource(Source):
    """A 'popularity' stand-in over ids 1..n: a slice, so it can backfill anything."""

    class Params(SourceParams):
        n: int = 5000

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        assert isinstance(self.params, CatalogSource.Params)
        ids = np.arange(1, min(k, self.params.n) + 1, dtype=np.int64)
        return ids, (1.0 / ids).astype(np.float32)


class SlowLoad(Source):
    """Takes ``load_s`` to load (a big build's page-in), then answers like a tiny catalogue."""

    class Params(SourceParams):
        load_s: float = 2.0

    def __init__(self, name: str, params: SourceParams, context: SourceContext) -> None:
        super().__init__(name, params, context)
        assert isinstance(params, SlowLoad.Params)
        time.sleep(params.load_s)

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        ids = np.arange(1, min(k, 50) + 1, dtype=np.int64)
        return ids, (1.0 / ids).astype(np.float32)
