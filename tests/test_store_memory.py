"""The shared store behaviour on the embedded MemoryStore."""

from __future__ import annotations

from typing import Any

from retrieval.store import MemoryStore
from tests.store_suite import StoreSuite


class TestMemoryStore(StoreSuite):
    supports_history_ttl = False  # MemoryStore has no TTL yet: that test skips with a reason

    def make_store(self, **params: Any) -> MemoryStore:
        return MemoryStore(**params)
