"""The user's own recent items, ranked by recency, frequency and event weight.

Re-visits are a large share of next items in session commerce (public session data sets:
benchmarks/README.md), so a list of what the user just looked at is a strong, nearly free
source. It has nothing to build: everything it needs is the request's history.

Note: with the blender's ``exclude_seen`` on (the default) every item this source returns is
filtered out as already seen, so the source is inert; use it with ``exclude_seen: false``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from pydantic import Field

from retrieval.ids import lookup_ids
from retrieval.types import DEFAULT_EVENT_WEIGHTS, Deadline, Request
from sources.base import Need, Ranked, SkipSource, Source, SourceParams, register
from sources.history import weighted_history

__all__ = ["RecentParams", "RecentSource"]


class RecentParams(SourceParams):
    """The user's own recent items: each item of the last ``history`` events scores the sum of
    its events' weights, an event ``j`` steps back from the newest weighing
    ``recency_decay ** j`` times its event type's weight. Nothing to build. Inert while
    ``blend.exclude_seen`` is on (every item it returns has been seen): use it with
    ``exclude_seen: false``.
    """

    history: int = Field(
        50,
        ge=1,
        le=100_000,
        description="Most recent history events scored (the store keeps `store.history_len` "
        "per user; a request may carry `limits.max_history`).",
    )
    recency_decay: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="Weight of an event relative to the next newer one (the newest weighs 1); "
        "1.0: equal weights, so items rank by how often and how strongly they were touched.",
    )
    event_weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS),
        description="Weight of each event type (unknown types weigh 1); a history without "
        "event types weighs every event 1.",
    )


@register("recent")
class RecentSource(Source[RecentParams]):
    """Scores each item in the last ``history`` events by the sum of its decayed event weights.

    An item seen three times outranks one seen once at the same recency; ties go to the item seen
    last. Seed items are what the user is looking at right now, so they are neither scored nor
    returned.
    """

    Params = RecentParams
    needs = frozenset({Need.HISTORY})

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Ranked:
        """The user's own recent items, by weighted recency (re-visits are most of the next items
        in session commerce); skipped without a history."""
        if not request.history:
            raise SkipSource("request has no history (seed items alone are not recent items)")
        hist_request = (
            dataclasses.replace(request, seed_items=()) if request.seed_items else request
        )
        ids, weights = weighted_history(
            hist_request, self.params.history, self.params.recency_decay, self.params.event_weights
        )
        # Tie-break on the last position each item was seen at: later is better.
        window = request.history_ids[-self.params.history :]
        if window.dtype != np.int64:  # a mixed history: spelled as its window alone spells it
            window = lookup_ids(request.history[-self.params.history :], "request.history")
        rev_uniq, rev_first = np.unique(window[::-1], return_index=True)
        last_seen = len(window) - 1 - rev_first  # aligned with rev_uniq == ids (both sorted)
        if rev_uniq.shape != ids.shape:  # pragma: no cover - both are the sorted unique window
            last_seen = np.zeros(ids.shape[0], dtype=np.int64)
        order = np.lexsort((-last_seen, -weights))
        if request.seed_items:
            order = order[
                ~np.isin(ids[order], lookup_ids(request.seed_items, "request.seed_items"))
            ]
        order = order[:k]
        return ids[order], weights[order].astype(np.float32, copy=False)
