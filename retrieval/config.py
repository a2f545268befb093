"""YAML configuration, validated in one place.

Validation runs in stages so that every error names its path inside the file: the YAML loader
refuses anchors, aliases and duplicate keys; pydantic checks the shape of the whole document;
each source's ``params`` are checked against the model of the class its ``kind`` resolves to
(the registry is the union keyed on ``kind``); the cross-field rules (duplicate names, quotas,
timeouts) run last. All problems are reported at once: a part of the document that fails its
shape check is left out of the later stages, the rest still goes through them.

No message carries a secret: URLs are redacted, and values under ``store`` are never echoed.
"""

from __future__ import annotations

import inspect
import os
import re
import traceback
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
)
from pydantic_core import ErrorDetails

from retrieval.errors import InputError
from retrieval.redact import redact_text, secrets_of
from retrieval.types import DEFAULT_EVENT_WEIGHTS, MAX_K
from sources.base import Source, SourceParams, UnknownKindError, resolve_kind

__all__ = [
    "ArmConfig",
    "BlendConfig",
    "BreakerConfig",
    "ConfigError",
    "EventsConfig",
    "ExperimentConfig",
    "LimitsConfig",
    "RetrievalConfig",
    "SourceConfig",
    "StoreConfig",
    "arm_blend",
    "field_path",
    "load_config",
]

IDENTIFIER = r"^[a-z][a-z0-9_]{0,62}$"
REDIS_URL_ENV = "RETRIEVAL_REDIS_URL"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_MAX_ECHO = 80  # characters of a bad value quoted back in a message


class ConfigError(InputError):
    """A config that cannot work; ``problems`` lists ``(path, message)`` pairs.

    Every message is redacted (URLs, and the ``secrets`` given) before it is kept.
    """

    def __init__(
        self, origin: str, problems: Sequence[tuple[str, str]], *, secrets: Iterable[str] = ()
    ) -> None:
        secrets = list(secrets)
        self.origin = origin
        self.problems = [
            (redact_text(path, secrets), redact_text(msg, secrets)) for path, msg in problems
        ]
        lines = [
            f"{origin}: {path}: {msg}" if path else f"{origin}: {msg}"
            for path, msg in self.problems
        ]
        head = f"invalid config ({len(self.problems)} problem{'s' * (len(self.problems) != 1)})"
        super().__init__(head + "\n  " + "\n  ".join(lines))


class ColumnMap(BaseModel):
    """The event log's column names (YAML ``events.columns``), so a log with other headers is
    read as it is. An optional column named here explicitly must exist in the file."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field("user_id", description="Column of user ids (int64 or non-empty text).")
    item_id: str = Field("item_id", description="Column of item ids (int64 or non-empty text).")
    timestamp: str = Field(
        "timestamp", description="Column of event times: unix seconds, or ISO-8601 text."
    )
    event_type: str = Field(
        "event_type",
        description="Optional column of event types (`click`, `cart`, ...), weighed by "
        "`events.weights`; without it every event weighs 1.",
    )
    session_id: str = Field(
        "session_id",
        description="Optional column of session ids; without it co-visitation cuts a user's "
        "events into sessions at gaps of its `session_gap_s`.",
    )
    weight: str = Field(
        "weight",
        description="Optional column of per-event weights, multiplied by the event type's "
        "weight; without it every event weighs 1.",
    )


class _Model(BaseModel):
    """Base of the config sections: numbers must be finite (YAML's ``.inf`` and ``.nan`` are
    refused) and unknown keys are errors, so a typo is never silently ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Strict types: YAML already types its scalars, so `k: true`, `k: "10"` or `k: 1.5` is a mistake,
# not something to coerce. An int is still a valid float.
Int = StrictInt
Bool = StrictBool
Float = StrictFloat


class BlendConfig(_Model):
    """How the sources' lists become one slate (YAML ``blend``): the merge strategy, the
    filters applied after it, the fallback that tops up a short slate, and each source's lane."""

    strategy: Literal["rrf", "quota", "score", "calibrated"] = Field(
        "rrf",
        description="`rrf`: weighted reciprocal rank fusion, `sum weight / (rrf_k + rank + 1)`; "
        "`score`: each source's min-max normalised score times its weight; `quota`: each source "
        "in config order fills its `quota` with items no earlier source took, unused slots go "
        "round-robin to the others, the slate interleaves sources by rank; `calibrated`: each "
        "candidate's chance of being a hit, `1 - prod(1 - p_source(rank))`, from rank curves "
        "(`retrieval calibrate`), quotas as floors. `rrf` is the default because it needs "
        "neither comparable scores nor fitted curves.",
    )
    calibration: Path | None = Field(
        None,
        description="Rank curves file for `calibrated` (written by `retrieval calibrate` or "
        "`retrieval tune`), relative to the config file; unset: "
        "`<artifacts>/calibration.json`.",
    )
    rrf_k: Float = Field(
        60.0,
        ge=0,
        description="RRF's rank offset: larger values flatten the difference between the top "
        "ranks and the rest. 60 is the constant of the original RRF paper (Cormack et al., "
        "2009).",
    )
    exclude_seen: Bool = Field(
        True,
        description="Drop the items in the user's history from the slate: the one place re-visits "
        "are filtered (the sources keep them as candidates). Off when the next stage wants "
        "re-visits (they are a large share of next items in session commerce).",
    )
    blocklist: Path | None = Field(
        None,
        description="A file with one item id per line, never returned (relative to the config "
        "file); unset: no blocklist.",
    )
    fallback: str | None = Field(
        None,
        description="Name of a source (one of `sources[].name`) that tops up a slate shorter than "
        "`k`, asked again, deeper, if exclusions ate its list; unset: a short slate stays short.",
    )
    workers: Int | None = Field(
        None,
        ge=1,
        le=256,
        description="Calls in flight per source, on that source's own threads (made once per "
        "retriever); a call beyond it is reported `shed`, not queued. Unset: 32, above the "
        "callers' usual concurrency, so only a source that hoards calls is shed.",
    )
    merge_reserve_ms: Float = Field(
        1.0,
        ge=0,
        description="Time kept back from `deadline_ms` for merging, in ms; must be below "
        "`deadline_ms`. The default covers the merge of a few sources' lists of ~1,000 items.",
    )


class BreakerConfig(_Model):
    """The per-source circuit breaker (YAML ``breaker``): a source that keeps failing is skipped
    (reported ``circuit_open``) so it stops taking threads and time, and is probed again later."""

    failures: Int = Field(
        5,
        ge=1,
        description="Consecutive failures that open a source's breaker: errors, and timeouts of "
        "calls that started with most of their budget. Several, so one slow call does not "
        "silence a source.",
    )
    cooldown_s: Float = Field(
        10.0,
        gt=0,
        description="Seconds an open breaker waits before one probe call; a success closes it, "
        "a failure opens it for another cool-down.",
    )


class StoreConfig(_Model):
    """The online store (YAML ``store``): live user history, live popularity counters and the
    result cache, in this process (``memory``) or shared through Redis (``redis``). ``url`` is
    overridden by ``$RETRIEVAL_REDIS_URL`` when that is set."""

    kind: Literal["memory", "redis"] = Field(
        "memory",
        description="`memory`: embedded, one process, nothing to run; `redis`: shared by every "
        "process and host (needs the `[redis]` extra and `url`).",
    )
    history_len: Int = Field(
        200,
        ge=0,
        le=100_000,
        description="Recent events kept per user (0: no live history). More than the sources "
        "read (their `history` params), so any of them can be raised without losing events.",
    )
    history_ttl_s: Float | None = Field(
        None,
        gt=0,
        description="Seconds after a user's last event when their history expires; unset: kept "
        "until pushed out by newer events.",
    )
    half_life_s: Float = Field(
        86_400.0,
        gt=0,
        description="Half-life of the live popularity counters, in seconds: an event's weight "
        "halves every `half_life_s`. One day: today's events lead, yesterday's still count "
        "half.",
    )
    url: str | None = Field(
        None,
        description="`redis://`, `rediss://` (TLS) or `unix://` URL; required for `redis`. "
        "`$RETRIEVAL_REDIS_URL` overrides it; write `${REDIS_URL}` to keep it out of the file.",
    )
    prefix: str = Field(
        "cr",
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="Every Redis key starts with `{prefix}:`, so deployments can share a server.",
    )
    socket_timeout_ms: Float = Field(
        100.0,
        gt=0,
        le=60_000,
        description="Timeout of Redis writes (`record()`), in ms; reads use the time left before "
        "the request's deadline instead.",
    )
    read_reserve_ms: Float = Field(
        10.0,
        ge=0,
        description="Time, in ms, a store read leaves for the sources when the store is slow (at "
        "most half of what is left), so a slow store degrades the blend instead of timing out "
        "every source.",
    )
    buffer_events: Int = Field(
        0,
        ge=0,
        le=10_000_000,
        description="With Redis down, `record()` keeps up to this many events in memory and sends "
        "them, in order, once it is back (the oldest are dropped beyond it, and counted). 0: "
        "`record()` raises `StoreUnavailable` instead, so no event is lost silently.",
    )
    cache_ttl_s: Float = Field(
        0.0,
        ge=0,
        description="Lifetime of cached blend results, in seconds; 0 turns the result cache off "
        "(the default: a cached slate does not see events recorded since).",
    )


EventWeight = Annotated[Float, Field(ge=0)]


class EventsConfig(_Model):
    """The event log (YAML ``events``): its column names, the segment columns to keep and the
    weight of each event type."""

    columns: ColumnMap = Field(
        default_factory=ColumnMap, description="The log's column names (see `ColumnMap`)."
    )
    segments: list[str] = Field(
        default_factory=list,
        description="Segment columns to keep from the log (e.g. `country`), besides those a "
        "source's own `segments` param names.",
    )
    weights: dict[Annotated[str, Field(min_length=1)], EventWeight] = Field(
        default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS),
        description="Weight of each event type (unknown types weigh 1): the one table for "
        "builds, sources and the live counters; a source's own `params.event_weights` wins.",
    )


class LimitsConfig(_Model):
    """Caps on what one request may carry (YAML ``limits``): a request beyond them is refused
    with ``RequestTooLarge`` before any source runs, so its size cannot eat the deadline."""

    max_exclude: Int = Field(
        10_000, ge=0, description="Most item ids one request may ask to exclude."
    )
    max_seed_items: Int = Field(1_000, ge=1, description="Most seed items one request may carry.")
    max_history: Int = Field(
        1_000,
        ge=1,
        description="Most history items per request: the store's are trimmed to the newest "
        "`max_history`, a longer history given by the caller is refused.",
    )


class ArmConfig(_Model):
    """One A/B arm (YAML ``experiment.arms[]``): a share of the users, served with the config's
    blend and sources, or with the overrides given here."""

    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Reported in the result (`arm`), the HTTP response and the metrics' `arm` "
        "label; letters, digits, `_`, `.`, `-`.",
    )
    share: Float = Field(
        gt=0, le=1, description="Fraction of users in this arm; the arms' shares sum to 1."
    )
    sources: list[str] | None = Field(
        None,
        description="The sources this arm blends, by name (config order is kept); null: all.",
    )
    blend: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of `blend` this arm sets differently, e.g. `{strategy: score}`.",
    )


class ExperimentConfig(_Model):
    """A/B arms (YAML ``experiment``): each user is assigned by a stable hash of the user id and
    ``salt``, so the same user stays in the same arm across requests, workers and restarts."""

    salt: str = Field(
        "arms",
        min_length=1,
        description="Mixed into the hash: change it to reshuffle users between arms.",
    )
    arms: list[ArmConfig] = Field(
        default_factory=list,
        description="The arms, at least two when set; requests without a user id get the first.",
    )


class SourceConfig(_Model):
    """One entry of YAML ``sources``: a named instance of a source kind with its own budget,
    blend weight and ``params`` (validated against the kind's ``Params`` model at load)."""

    name: str = Field(
        pattern=IDENTIFIER,
        description="Identifier (`[a-z][a-z0-9_]*`, at most 63 characters), unique in the file: "
        "it labels reports, logs and metrics.",
    )
    kind: str = Field(
        min_length=1,
        description="A built-in kind (`covisitation`, `itemcf`, `ann`, `popularity`, `recent`) "
        "or an import path `package.module:Class` to a `Source` subclass.",
    )
    timeout_ms: Float | None = Field(
        None,
        gt=0,
        description="This source's own budget, in ms (at most `deadline_ms`); unset: the global "
        "deadline.",
    )
    quota: Int | None = Field(
        None,
        ge=0,
        description="Slots for the `quota` strategy (floors for `calibrated`); all quotas sum to "
        "at most `k`. Unset: an equal share of what the explicit quotas leave.",
    )
    weight: Float = Field(1.0, ge=0, description="Weight in the `rrf` and `score` strategies.")
    required: Bool = Field(
        False,
        description="If it fails or times out, `blend()` raises `RequiredSourceError` instead of "
        "returning what the other sources found.",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The kind's own parameters, checked against its `Params` model (tables below).",
    )

    _cls: type[Source] | None = PrivateAttr(default=None)
    _params: SourceParams | None = PrivateAttr(default=None)

    @property
    def source_class(self) -> type[Source]:
        """The class ``kind`` resolved to (set when the whole config loads)."""
        if self._cls is None:
            raise RuntimeError("SourceConfig was not resolved; build it with RetrievalConfig.load")
        return self._cls

    @property
    def resolved_params(self) -> SourceParams:
        """``params`` validated against the kind's ``Params`` model (set when the config loads)."""
        if self._params is None:
            raise RuntimeError("SourceConfig was not resolved; build it with RetrievalConfig.load")
        return self._params


class RetrievalConfig(_Model):
    """A whole config file: what to retrieve (``k``, ``deadline_ms``), where the build is, how
    the log reads, how the blend merges, the store, request limits and the sources.

    Build it with ``load_config(path)`` or ``RetrievalConfig.load(data)``: they also resolve
    each source's ``params`` and run the checks across fields.
    """

    k: Int = Field(
        1000,
        ge=1,
        le=MAX_K,
        description="Candidates per blend (a request's `k` overrides it): about what a "
        "second-stage ranker scores.",
    )
    deadline_ms: Float = Field(
        50.0,
        gt=0,
        le=60_000,
        description="Budget of one blend, in ms (a request's `deadline_ms` overrides it); "
        "sources still running then are abandoned and reported `timeout`. The default is the "
        "first stage's share of an online request, well above what the built-in sources take.",
    )
    artifacts: Path | None = Field(
        None,
        description="The build directory to serve from (`retrieval build --out`), relative to the "
        "config file; required when a source learns from data.",
    )
    events: EventsConfig = Field(
        default_factory=EventsConfig, description="The event log's columns and weights."
    )
    blend: BlendConfig = Field(
        default_factory=BlendConfig, description="How the sources' lists are merged."
    )
    breaker: BreakerConfig = Field(
        default_factory=BreakerConfig, description="The per-source circuit breaker."
    )
    store: StoreConfig = Field(
        default_factory=StoreConfig, description="The online store (history, live counters)."
    )
    limits: LimitsConfig = Field(
        default_factory=LimitsConfig, description="Caps on what one request may carry."
    )
    experiment: ExperimentConfig = Field(
        default_factory=ExperimentConfig,
        description="A/B arms: other blends or source sets for shares of the users.",
    )
    sources: list[SourceConfig] = Field(
        description="The candidate sources, at least one; config order is the merge order (and "
        "the `quota` strategy's priority)."
    )

    _origin: str = PrivateAttr(default="<config>")
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def origin(self) -> str:
        """Where the config came from (its file path, or ``<config>``), for messages."""
        return self._origin

    @property
    def base_dir(self) -> Path:
        """Relative paths in the config resolve against the config file's folder."""
        return self._base_dir

    def resolve_path(self, path: Path | str) -> Path:
        """``path`` with ``~`` expanded, made absolute against ``base_dir`` when relative."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self._base_dir / p).resolve()

    def source(self, name: str) -> SourceConfig:
        """The source named ``name``; KeyError when there is none."""
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)

    @classmethod
    def load(
        cls,
        data: Any,
        origin: str = "<config>",
        base_dir: Path | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> RetrievalConfig:
        """Validate a parsed document; raise ConfigError listing every problem."""
        return _load(cls, data, origin, base_dir, environ, [])


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> RetrievalConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    origin = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(origin, [("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(origin, [("", f"cannot read file: {exc}")]) from None
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    except _Refused as exc:
        raise ConfigError(origin, [("", _yaml_message(exc))]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(origin, [("", "not valid YAML: " + _yaml_message(exc))]) from None
    except RecursionError:
        raise ConfigError(origin, [("", "not valid YAML: nested too deeply")]) from None
    finally:
        loader.dispose()
    base_dir = path.resolve().parent
    return _load(RetrievalConfig, data, origin, base_dir, environ, loader.duplicates)


# -- the YAML loader ---------------------------------------------------------------------------


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML this loader will not take (anchors and aliases)."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors or aliases (a billion-laughs document expands aliases into
    billions of nodes: refused at the first anchor, before anything is built), and which
    records duplicate keys instead of letting the last one win silently."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, str]] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(
                problem=f"YAML aliases (*{event.anchor}) are not allowed in a config; "
                "write the value out where it is used",
                problem_mark=mark,
            )
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _Refused(
                problem=f"YAML anchors (&{anchor}) are not allowed in a config; "
                "write the value out where it is used",
                problem_mark=mark,
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue  # an unhashable key: SafeLoader's own error names it
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in first:
                shown = repr(key)[:_MAX_ECHO]
                self.duplicates.append(
                    (
                        "",
                        f"line {line}, column {key_node.start_mark.column + 1}: duplicate key "
                        f"{shown} (first on line {first[key]}); YAML would keep only the last "
                        "value, so one of them would be ignored silently",
                    )
                )
            else:
                first[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_message(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return f"{where}{problem}"


# -- validation --------------------------------------------------------------------------------


def _load(
    cls: type[RetrievalConfig],
    data: Any,
    origin: str,
    base_dir: Path | None,
    environ: Mapping[str, str] | None,
    early: Sequence[tuple[str, str]],
) -> RetrievalConfig:
    problems = list(early)
    if not isinstance(data, dict):
        kind = type(data).__name__ if data is not None else "an empty document"
        problems.append(("", f"expected a mapping at the top level, got {kind}"))
        raise ConfigError(origin, problems)
    environ = environ if environ is not None else os.environ
    # Strings only, in a tree: the loader refused aliases, so nothing here is walked twice.
    env_problems: list[tuple[str, str]] = []
    data = _substitute_env(data, environ, "", env_problems)
    secrets = _secrets_in(data)
    override = environ.get(REDIS_URL_ENV)
    if override:
        secrets += secrets_of(override)
    store = data.get("store")
    if override and isinstance(store, dict) and store.get("kind") == "redis":
        data = {**data, "store": {**store, "url": override}}
    found, config = _check(cls, data)
    unset = [path for path, _ in env_problems]  # said once: not again as "empty" or "missing"
    problems += env_problems + [(p, m) for p, m in found if not any(_under(p, u) for u in unset)]
    if problems or config is None:
        raise ConfigError(origin, problems, secrets=secrets)
    config._origin = origin
    config._base_dir = base_dir if base_dir is not None else Path.cwd()
    return config


def _check(
    cls: type[RetrievalConfig], data: dict[Any, Any]
) -> tuple[list[tuple[str, str]], RetrievalConfig | None]:
    """Every problem in ``data``, and the config when there is none.

    When the shape check fails, the parts that failed are left out, and the later stages run on
    the rest: each source that parsed gets its params checked, and the cross checks run on the
    fields they read when those parsed.
    """
    problems: list[tuple[str, str]] = []
    bad: set[str] = set()
    try:
        config: RetrievalConfig | None = cls.model_validate(data)
    except ValidationError as exc:
        config = None
        errors = exc.errors(include_url=False)
        problems += _pydantic_problems(errors, cls, "")
        bad = {str(e["loc"][0]) for e in errors if e["loc"]}
    if config is not None:
        partial: RetrievalConfig | None = config
        entries = [(f"sources[{i}]", sc) for i, sc in enumerate(config.sources)]
        complete = True
    else:
        raw = data.get("sources")
        entries, complete, more = _parse_sources(raw, errors)
        if isinstance(raw, dict):
            problems = [
                (p, m)
                if p != "sources"
                else (
                    p,
                    "expected a list of sources (each '- name: ..., kind: ...'), got a "
                    "mapping; its entries are checked below as if listed",
                )
                for p, m in problems
            ]
        problems += more
        cleaned = {k: v for k, v in data.items() if k not in bad}
        cleaned["sources"] = []
        try:
            partial = cls.model_validate(cleaned)
        except ValidationError:  # pragma: no cover - every failing part was left out
            partial = None
    weights: Mapping[str, float] = DEFAULT_EVENT_WEIGHTS
    if partial is not None and "events" not in bad:
        weights = partial.events.weights
    problems += _resolve_sources(entries, weights)
    if partial is not None:
        problems += _cross_checks(partial, entries, complete, bad)
    return problems, config


def _parse_sources(
    raw: Any, errors: Sequence[ErrorDetails]
) -> tuple[list[tuple[str, SourceConfig]], bool, list[tuple[str, str]]]:
    """The sources that parse, labelled with their paths; whether that is all of them; and the
    problems of a ``sources:`` written as a mapping (name: {kind: ...}) instead of a list."""
    entries: list[tuple[str, SourceConfig]] = []
    problems: list[tuple[str, str]] = []
    if isinstance(raw, list):
        failed = {
            e["loc"][1]
            for e in errors
            if len(e["loc"]) > 1 and e["loc"][0] == "sources" and isinstance(e["loc"][1], int)
        }
        for i, item in enumerate(raw):
            if i not in failed:
                try:
                    entries.append((f"sources[{i}]", SourceConfig.model_validate(item)))
                except ValidationError:  # pragma: no cover - it passed as part of the document
                    failed.add(i)
        return entries, not failed, problems
    if isinstance(raw, dict):
        for key, item in raw.items():
            path = _join("sources", str(key))
            if isinstance(item, dict) and "name" not in item:
                item = {"name": key, **item}
            try:
                entries.append((path, SourceConfig.model_validate(item)))
            except ValidationError as exc:
                problems += _pydantic_problems(exc.errors(include_url=False), SourceConfig, path)
    return entries, False, problems


def _substitute_env(
    value: Any, environ: Mapping[str, str], path: str, problems: list[tuple[str, str]]
) -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in strings, so secrets stay out of the file."""
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            problems.append((path, f"environment variable {name} is not set"))
            return ""

        return _ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        return {
            k: _substitute_env(v, environ, _join(path, str(k)), problems) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_substitute_env(v, environ, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    return value


def _secrets_in(value: Any) -> list[str]:
    """The passwords of every URL in the document, to scrub from messages however quoted."""
    found: list[str] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if "://" in v:
                found += secrets_of(v)
        elif isinstance(v, dict):
            stack += list(v.keys()) + list(v.values())
        elif isinstance(v, list):
            stack += v
    return found


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith((parent + ".", parent + "["))


def field_path(loc: Sequence[int | str], prefix: str = "") -> str:
    """A pydantic error location as one readable path: ``sources[1].params.window``."""
    out = prefix
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, str(part))
    return out


def _model_at(model: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class that owns the last key of ``loc``, to list the keys it allows."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _echo(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= _MAX_ECHO else shown[: _MAX_ECHO - 3] + "..."


def _pydantic_problems(
    errors: Sequence[ErrorDetails], model: type[BaseModel], prefix: str
) -> list[tuple[str, str]]:
    problems = []
    for err in errors:
        loc = err["loc"]
        path = field_path(loc, prefix)
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            allowed = ", ".join(owner.model_fields) if owner is not None else "see the docs"
            msg = f"unknown key {_echo(str(loc[-1]))}; allowed: {allowed}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"]
            # Never echo what was given under store: a URL with its password, a typo'd secret.
            secret = not prefix and bool(loc) and loc[0] == "store"
            if "input" in err and not isinstance(err["input"], dict | list):
                msg += (
                    " (the value is not shown: it may hold a secret)"
                    if secret
                    else (f" (got {_echo(err['input'])})")
                )
        problems.append((path, msg))
    return problems


def _resolve_kind(kind: str) -> type[Source] | str:
    """The class of ``kind``, or why it cannot be used (a plugin's import errors included)."""
    module = kind.partition(":")[0]
    try:
        cls = resolve_kind(kind)
    except UnknownKindError as exc:
        return str(exc)
    except SyntaxError as exc:
        return (
            f"cannot import module {module!r} for kind {kind!r}: syntax error in "
            f"{exc.filename}, line {exc.lineno}: {exc.msg}"
        )
    except Exception as exc:  # the plugin's module raised while being imported
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""
        return (
            f"cannot import module {module!r} for kind {kind!r}: it raised "
            f"{type(exc).__name__}: {exc}{where}"
        )
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        return (
            f"{cls.__module__}.{cls.__qualname__} is abstract (it does not implement "
            f"{missing}): a source kind must be a concrete class"
        )
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, SourceParams)):
        return (
            f"{cls.__module__}.{cls.__qualname__}.Params must be a subclass of "
            "sources.base.SourceParams"
        )
    return cls


def _resolve_sources(
    entries: Sequence[tuple[str, SourceConfig]], event_weights: Mapping[str, float]
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for path, src in entries:
        cls = _resolve_kind(src.kind)
        if isinstance(cls, str):
            problems.append((f"{path}.kind", cls))
            continue
        raw = src.params
        if "event_weights" in cls.Params.model_fields and "event_weights" not in raw:
            raw = {**raw, "event_weights": dict(event_weights)}  # builds and serving agree
        try:
            params = cls.Params.model_validate(raw)
        except ValidationError as exc:
            problems += _pydantic_problems(
                exc.errors(include_url=False), cls.Params, f"{path}.params"
            )
            continue
        src._cls = cls
        src._params = params
    return problems


def _cross_checks(
    config: RetrievalConfig,
    entries: Sequence[tuple[str, SourceConfig]],
    complete: bool,
    bad: set[str],
) -> list[tuple[str, str]]:
    """Rules across fields. ``entries`` are the sources that parsed (``complete``: all of them);
    a check that reads a top-level field in ``bad`` (it failed its shape check) is skipped."""
    problems: list[tuple[str, str]] = []
    if complete and not entries:
        problems.append(("sources", "at least one source is required"))
    first_seen: dict[str, str] = {}
    for path, src in entries:
        if src.name in first_seen:
            problems.append(
                (
                    f"{path}.name",
                    f"duplicate source name {src.name!r} (also {first_seen[src.name]}); "
                    "names label reports and metrics, so they must be unique",
                )
            )
        else:
            first_seen[src.name] = path
        if (
            "deadline_ms" not in bad
            and src.timeout_ms is not None
            and src.timeout_ms > config.deadline_ms
        ):
            problems.append(
                (
                    f"{path}.timeout_ms",
                    f"{src.timeout_ms:g} ms is above the global deadline_ms "
                    f"({config.deadline_ms:g}); allowed: at most {config.deadline_ms:g}",
                )
            )
    quotas = [s.quota for _, s in entries if s.quota is not None]
    if "k" not in bad and sum(quotas) > config.k:  # more sources can only add to the sum
        problems.append(
            ("sources", f"quotas sum to {sum(quotas)}, more than k ({config.k}); lower them")
        )
    blend = config.blend
    fb = blend.fallback
    if complete and "blend" not in bad and fb is not None and fb not in first_seen:
        problems.append(
            (
                "blend.fallback",
                f"no source named {fb!r}; allowed: {', '.join(first_seen) or '(no sources)'}",
            )
        )
    if not {"blend", "deadline_ms"} & bad and blend.merge_reserve_ms >= config.deadline_ms:
        problems.append(
            (
                "blend.merge_reserve_ms",
                f"{blend.merge_reserve_ms:g} ms would leave no time for the sources: it must be "
                f"below deadline_ms ({config.deadline_ms:g})",
            )
        )
    calibrated = blend.strategy == "calibrated"
    if (
        not {"blend", "artifacts"} & bad
        and calibrated
        and blend.calibration is None
        and config.artifacts is None
    ):
        problems.append(
            (
                "blend.calibration",
                "the calibrated strategy needs rank curves: set blend.calibration or "
                "artifacts (curves are read from <artifacts>/calibration.json)",
            )
        )
    if complete and "experiment" not in bad and "blend" not in bad:
        problems += _arm_problems(config, list(first_seen))
    if "store" not in bad and config.store.kind == "redis" and not config.store.url:
        problems.append(
            (
                "store.url",
                f"required when store.kind is redis (e.g. ${{REDIS_URL}}, or set {REDIS_URL_ENV})",
            )
        )
    return problems


def _arm_problems(config: RetrievalConfig, names: Sequence[str]) -> list[tuple[str, str]]:
    """The arms' shares, names, source subsets and blend overrides (each arm's blend is
    validated as a whole ``blend`` section, so its errors read like the base one's)."""
    arms = config.experiment.arms
    if not arms:
        return []
    problems: list[tuple[str, str]] = []
    if len(arms) < 2:
        problems.append(("experiment.arms", "an experiment needs at least two arms"))
    total = sum(a.share for a in arms)
    if abs(total - 1.0) > 1e-6:
        problems.append(
            ("experiment.arms", f"shares sum to {total:g}; they must sum to 1 (e.g. 0.5 and 0.5)")
        )
    seen: set[str] = set()
    for i, arm in enumerate(arms):
        at = f"experiment.arms[{i}]"
        if arm.name in seen:
            problems.append((f"{at}.name", f"duplicate arm name {arm.name!r}"))
        seen.add(arm.name)
        chosen = names if arm.sources is None else arm.sources
        for j, name in enumerate(arm.sources or ()):
            if name not in names:
                problems.append(
                    (f"{at}.sources[{j}]", f"no source named {name!r}; allowed: {', '.join(names)}")
                )
        if arm.sources is not None and not arm.sources:
            problems.append((f"{at}.sources", "at least one source (or null: all of them)"))
        try:
            blend = arm_blend(config, arm)
        except ValidationError as exc:
            for err in exc.errors():
                problems.append((field_path(err["loc"], f"{at}.blend"), err["msg"]))
            continue
        if blend.fallback is not None and blend.fallback not in chosen:
            problems.append(
                (
                    f"{at}.blend.fallback",
                    f"{blend.fallback!r} is not among this arm's sources; allowed: "
                    f"{', '.join(chosen)} (or null)",
                )
            )
    return problems


def arm_blend(config: RetrievalConfig, arm: ArmConfig) -> BlendConfig:
    """The ``blend`` section ``arm`` runs: the config's, with the arm's keys over it."""
    if not arm.blend:
        return config.blend
    return BlendConfig.model_validate({**config.blend.model_dump(), **arm.blend})
