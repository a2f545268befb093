"""YAML configuration, validated in one place.

Validation runs in two stages so that every error names its path inside the file: pydantic checks
the shape of the whole document, then each source's ``params`` are checked against the model of
the class its ``kind`` resolves to (the registry is the union keyed on ``kind``), and the
cross-field rules (duplicate names, quotas, timeouts) run last. All problems are reported at once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from retrieval.events import ColumnMap
from sources.base import Source, SourceParams, UnknownKindError, resolve_kind

__all__ = [
    "BlendConfig",
    "BreakerConfig",
    "ConfigError",
    "EventsConfig",
    "RetrievalConfig",
    "SourceConfig",
    "StoreConfig",
    "load_config",
]

IDENTIFIER = r"^[a-z][a-z0-9_]{0,62}$"
REDIS_URL_ENV = "RETRIEVAL_REDIS_URL"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(ValueError):
    """A config that cannot work; ``problems`` lists ``(path, message)`` pairs."""

    def __init__(self, origin: str, problems: Sequence[tuple[str, str]]) -> None:
        self.origin = origin
        self.problems = list(problems)
        lines = [
            f"{origin}: {path}: {msg}" if path else f"{origin}: {msg}" for path, msg in problems
        ]
        head = f"invalid config ({len(self.problems)} problem{'s' * (len(self.problems) != 1)})"
        super().__init__(head + "\n  " + "\n  ".join(lines))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BlendConfig(_Model):
    strategy: Literal["rrf", "quota", "score", "calibrated"] = "rrf"
    calibration: Path | None = None  # default for "calibrated": <artifacts>/calibration.json
    rrf_k: float = Field(60.0, ge=0)
    exclude_seen: bool = True
    blocklist: Path | None = None
    fallback: str | None = None
    workers: int | None = Field(None, ge=1, le=256)
    merge_reserve_ms: float = Field(1.0, ge=0)


class BreakerConfig(_Model):
    failures: int = Field(5, ge=1)
    cooldown_s: float = Field(10.0, gt=0)


class StoreConfig(_Model):
    """The online store. ``url`` is overridden by ``$RETRIEVAL_REDIS_URL`` when that is set."""

    kind: Literal["memory", "redis"] = "memory"
    history_len: int = Field(200, ge=0, le=100_000)
    history_ttl_s: float | None = Field(None, gt=0)
    half_life_s: float = Field(86_400.0, gt=0)  # decay of the live popularity counters
    url: str | None = None
    prefix: str = Field("cr", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    socket_timeout_ms: float = Field(100.0, gt=0, le=60_000)  # writes; reads use the deadline
    read_reserve_ms: float = Field(10.0, ge=0)  # kept for the sources when the store is slow
    buffer_events: int = Field(0, ge=0, le=10_000_000)  # 0: record() raises when Redis is down
    cache_ttl_s: float = Field(0.0, ge=0)  # result cache; 0 = off


class EventsConfig(_Model):
    columns: ColumnMap = Field(default_factory=ColumnMap)
    segments: list[str] = Field(default_factory=list)


class SourceConfig(_Model):
    name: str = Field(pattern=IDENTIFIER)
    kind: str = Field(min_length=1)
    timeout_ms: float | None = Field(None, gt=0)
    quota: int | None = Field(None, ge=0)
    weight: float = Field(1.0, ge=0)
    required: bool = False
    params: dict[str, Any] = Field(default_factory=dict)

    _cls: type[Source] | None = PrivateAttr(default=None)
    _params: SourceParams | None = PrivateAttr(default=None)

    @property
    def source_class(self) -> type[Source]:
        if self._cls is None:
            raise RuntimeError("SourceConfig was not resolved; build it with RetrievalConfig.load")
        return self._cls

    @property
    def resolved_params(self) -> SourceParams:
        if self._params is None:
            raise RuntimeError("SourceConfig was not resolved; build it with RetrievalConfig.load")
        return self._params


class RetrievalConfig(_Model):
    k: int = Field(1000, ge=1, le=1_000_000)
    deadline_ms: float = Field(50.0, gt=0, le=60_000)
    artifacts: Path | None = None
    events: EventsConfig = Field(default_factory=EventsConfig)
    blend: BlendConfig = Field(default_factory=BlendConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    sources: list[SourceConfig]

    _origin: str = PrivateAttr(default="<config>")
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def origin(self) -> str:
        return self._origin

    @property
    def base_dir(self) -> Path:
        """Relative paths in the config resolve against the config file's folder."""
        return self._base_dir

    def resolve_path(self, path: Path | str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self._base_dir / p).resolve()

    def source(self, name: str) -> SourceConfig:
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
        if not isinstance(data, dict):
            kind = type(data).__name__ if data is not None else "an empty document"
            raise ConfigError(origin, [("", f"expected a mapping at the top level, got {kind}")])
        problems: list[tuple[str, str]] = []
        environ = environ if environ is not None else os.environ
        data = _substitute_env(data, environ, "", problems)
        if problems:
            raise ConfigError(origin, problems)
        store = data.get("store")
        if environ.get(REDIS_URL_ENV) and isinstance(store, dict) and store.get("kind") == "redis":
            data = {**data, "store": {**store, "url": environ[REDIS_URL_ENV]}}
        try:
            config = cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(origin, _pydantic_problems(exc, cls, "")) from None
        config._origin = origin
        config._base_dir = base_dir if base_dir is not None else Path.cwd()
        problems.extend(_resolve_sources(config))
        problems.extend(_cross_checks(config))
        if problems:
            raise ConfigError(origin, problems)
        return config


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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(origin, [("", f"not valid YAML: {where}{problem}")]) from None
    return RetrievalConfig.load(data, origin, base_dir=path.resolve().parent, environ=environ)


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


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _format_loc(loc: Sequence[int | str], prefix: str = "") -> str:
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


def _pydantic_problems(
    exc: ValidationError, model: type[BaseModel], prefix: str
) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        path = _format_loc(loc, prefix)
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            allowed = ", ".join(owner.model_fields) if owner is not None else "see the docs"
            msg = f"unknown key {str(loc[-1])!r}; allowed: {allowed}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"]
            if "input" in err and not isinstance(err["input"], dict | list):
                msg += f" (got {err['input']!r})"
        problems.append((path, msg))
    return problems


def _resolve_sources(config: RetrievalConfig) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for i, src in enumerate(config.sources):
        try:
            cls = resolve_kind(src.kind)
        except UnknownKindError as exc:
            problems.append((f"sources[{i}].kind", str(exc)))
            continue
        try:
            params = cls.Params.model_validate(src.params)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(exc, cls.Params, f"sources[{i}].params"))
            continue
        src._cls = cls
        src._params = params
    return problems


def _cross_checks(config: RetrievalConfig) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if not config.sources:
        problems.append(("sources", "at least one source is required"))
    first_seen: dict[str, int] = {}
    for i, src in enumerate(config.sources):
        if src.name in first_seen:
            problems.append(
                (
                    f"sources[{i}].name",
                    f"duplicate source name {src.name!r} (also sources[{first_seen[src.name]}]); "
                    "names label reports and metrics, so they must be unique",
                )
            )
        else:
            first_seen[src.name] = i
        if src.timeout_ms is not None and src.timeout_ms > config.deadline_ms:
            problems.append(
                (
                    f"sources[{i}].timeout_ms",
                    f"{src.timeout_ms:g} ms is above the global deadline_ms "
                    f"({config.deadline_ms:g}); allowed: at most {config.deadline_ms:g}",
                )
            )
    quotas = [s.quota for s in config.sources if s.quota is not None]
    if sum(quotas) > config.k:
        problems.append(
            ("sources", f"quotas sum to {sum(quotas)}, more than k ({config.k}); lower them")
        )
    fb = config.blend.fallback
    if fb is not None and fb not in first_seen:
        problems.append(
            (
                "blend.fallback",
                f"no source named {fb!r}; allowed: {', '.join(first_seen) or '(no sources)'}",
            )
        )
    calibrated = config.blend.strategy == "calibrated"
    if calibrated and config.blend.calibration is None and config.artifacts is None:
        problems.append(
            (
                "blend.calibration",
                "the calibrated strategy needs rank curves: set blend.calibration or "
                "artifacts (curves are read from <artifacts>/calibration.json)",
            )
        )
    if config.store.kind == "redis" and not config.store.url:
        problems.append(
            (
                "store.url",
                f"required when store.kind is redis (e.g. ${{REDIS_URL}}, or set {REDIS_URL_ENV})",
            )
        )
    return problems
