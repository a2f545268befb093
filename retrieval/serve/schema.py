"""The HTTP bodies, as pydantic models: they validate requests (a bad field is a 422 that names
it) and describe the API in the OpenAPI document at ``/openapi.json``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from retrieval.types import MAX_K

__all__ = [
    "MAX_EVENTS_PER_BATCH",
    "BlendBody",
    "BlendResponse",
    "EventBody",
    "EventsBody",
    "SourceReportBody",
]

MAX_EVENTS_PER_BATCH = 10_000

Id = StrictInt | StrictStr


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BlendBody(_Body):
    """``Retriever.blend``'s request fields; ``fields=ids`` answers with the ids alone."""

    user_id: Id | None = Field(
        None, description="Reads live history from the store; picks the arm."
    )
    history: list[Id] = Field(default_factory=list, description="Recent items, oldest first.")
    seed_items: list[Id] = Field(default_factory=list, description="Items to find neighbours of.")
    context: dict[str, str] = Field(
        default_factory=dict, description="Segment values, e.g. {country: DE}."
    )
    exclude: list[Id] = Field(default_factory=list, description="Items never to return.")
    k: StrictInt | None = Field(None, ge=1, le=MAX_K, description="Candidates wanted.")
    deadline_ms: StrictFloat | StrictInt | None = Field(
        None, gt=0, le=60_000, description="This request's budget."
    )
    vector: list[StrictFloat | StrictInt] | None = Field(
        None, description="A query embedding for the ann source."
    )
    fields: Literal["full", "ids"] = Field(
        "full", description="full: ids, scores, ranks per source, reports; ids: ids and reports."
    )


class SourceReportBody(BaseModel):
    name: str
    status: str
    latency_ms: float
    returned: int
    survived: int
    error: str | None


class BlendResponse(BaseModel):
    """Columnar, like ``CandidateSet``: ``ranks[source][i]`` is candidate ``i``'s rank in that
    source's list, -1 where the source did not return it (its provenance)."""

    count: int
    arm: str | None
    elapsed_ms: float
    store: str
    cache_hit: bool
    backfilled: int
    filtered: int
    item_ids: list[Id]
    scores: list[float] | None = None
    ranks: dict[str, list[int]] | None = None
    reports: list[SourceReportBody]


class EventBody(_Body):
    user_id: Id
    item_id: Id
    timestamp: StrictFloat | StrictInt | None = Field(
        None, description="Unix seconds; the server's clock when left out."
    )
    event_type: StrictStr = "click"
    context: dict[str, str] | None = None


class EventsBody(_Body):
    """One batch for ``record_many``: checked whole, written whole or not at all."""

    events: list[EventBody] = Field(min_length=1, max_length=MAX_EVENTS_PER_BATCH)
