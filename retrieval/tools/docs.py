"""The README's YAML reference, generated from the pydantic models that validate the config.

The models are the one place a key is defined: its type and bounds (what validation accepts), its
default and its ``Field(description=...)``. ``yaml_reference()`` renders them as markdown: the
config file's sections (``RetrievalConfig`` and the models under it), then the ``params`` of each
built-in source kind (``resolve_kind(kind).Params``). The README holds that text between two
markers, rewritten in place::

    python -m retrieval.tools.docs --write README.md    # regenerate the block
    python -m retrieval.tools.docs --check README.md    # exit 1 when the block is stale
    python -m retrieval.tools.docs                      # print the reference

``tests/test_docs.py`` fails when the README's block is not what this renders now, and when a
field has no description.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from retrieval.config import RetrievalConfig
from sources.base import BUILTIN_KINDS, SourceParams, known_kinds, resolve_kind

__all__ = [
    "END",
    "START",
    "Row",
    "builtin_params",
    "config_models",
    "config_rows",
    "current_block",
    "main",
    "params_rows",
    "replace_block",
    "undocumented",
    "yaml_reference",
]

START = "<!-- yaml-reference:start -->"
END = "<!-- yaml-reference:end -->"
COMMAND = "python -m retrieval.tools.docs --write README.md"

# Params that default to a config-wide value, not to their model's default, when a source leaves
# them out: ``retrieval.config._resolve_sources`` fills them in (a test holds the two together).
INHERITED = {"event_weights": "events.weights"}


@dataclass(frozen=True)
class Row:
    """One key of the reference: its path, default, what validation allows, its description."""

    key: str
    default: str
    allowed: str
    description: str
    model: type[BaseModel]
    field: str
    rebuild: bool | None = None  # params of a kind that learns: does a change need a new build


# -- the models ----------------------------------------------------------------------------------


def builtin_params() -> list[tuple[str, type[SourceParams]]]:
    """``(kind, Params)`` for every built-in source kind, in ``known_kinds()`` order."""
    return [(k, resolve_kind(k).Params) for k in known_kinds() if k in BUILTIN_KINDS]


def config_models() -> list[type[BaseModel]]:
    """``RetrievalConfig`` and every model reachable through its fields, parents first."""
    found: list[type[BaseModel]] = []

    def visit(model: type[BaseModel]) -> None:
        if model in found:
            return
        found.append(model)
        for info in model.model_fields.values():
            nested = _nested_model(info.annotation)
            if nested is not None:
                visit(nested)

    visit(RetrievalConfig)
    return found


def undocumented() -> list[str]:
    """``Model.field`` for every field of the config and built-in params models without a
    description (blank counts as none)."""
    models = [*config_models(), *(p for _, p in builtin_params())]
    return [
        f"{m.__qualname__}.{name}"
        for m in models
        for name, info in m.model_fields.items()
        if not (info.description or "").strip()
    ]


# -- rows ----------------------------------------------------------------------------------------


def config_rows(model: type[BaseModel] = RetrievalConfig, prefix: str = "") -> list[Row]:
    """The keys of ``model`` (nested models expanded in place) with their full paths."""
    rows: list[Row] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = _nested_model(info.annotation)
        if nested is None:
            rows.append(_row(model, name, info, key))
        elif _is_list(info.annotation):
            rows += config_rows(nested, f"{key}[].")
        else:
            rows += config_rows(nested, f"{key}.")
    return rows


def params_rows(kind: str) -> list[Row]:
    """The ``params`` keys of the source kind ``kind``."""
    cls = resolve_kind(kind)
    params = cls.Params
    learns = cls.learns()
    rows = []
    for name, info in params.model_fields.items():
        row = _row(params, name, info, name)
        if name in INHERITED:
            row = replace(row, default=f"`{INHERITED[name]}`")
        rows.append(replace(row, rebuild=name not in params.serving_params if learns else None))
    return rows


def _row(model: type[BaseModel], name: str, info: FieldInfo, key: str) -> Row:
    return Row(
        key=key,
        default=_default(info),
        allowed=_allowed(info),
        description=" ".join((info.description or "").split()),
        model=model,
        field=name,
    )


# -- rendering -----------------------------------------------------------------------------------


def yaml_reference() -> str:
    """The markdown the README holds between ``START`` and ``END`` (markers excluded)."""
    out = [
        f"<!-- Generated from the config models by `{COMMAND}`: edit the models, not this. -->",
        "",
        "### The config file",
        "",
        _docstring(RetrievalConfig),
        "",
    ]
    top = [r for r in config_rows() if "." not in r.key and "[" not in r.key]
    sections = [
        (name, info)
        for name, info in RetrievalConfig.model_fields.items()
        if _nested_model(info.annotation) is not None
    ]
    out += _table(top + [_section_row(name, info) for name, info in sections])
    for name, info in sections:
        nested = _nested_model(info.annotation)
        assert nested is not None
        key = f"{name}[]" if _is_list(info.annotation) else name
        out += ["", f"#### `{key}`", ""]
        doc = _docstring(nested)
        if doc:
            out += [doc, ""]
        out += _table(config_rows(nested, f"{key}."))
    out += [
        "",
        "### `params` of the built-in source kinds",
        "",
        "Each kind validates `sources[].params` against its own model. For the kinds that learn "
        "from the log, *rebuild* says whether changing the key makes the retriever refuse the "
        "old build until `retrieval build` runs again.",
    ]
    for kind, params in builtin_params():
        out += ["", f"#### `kind: {kind}` (`{params.__module__}.{params.__qualname__}`)", ""]
        doc = _docstring(params)
        if doc:
            out += [doc, ""]
        out += _table(params_rows(kind))
    return "\n".join(out) + "\n"


def _section_row(name: str, info: FieldInfo) -> Row:
    where = f"`{name}[]`" if _is_list(info.annotation) else f"`{name}`"
    kind = "list of mappings" if _is_list(info.annotation) else "mapping"
    text = " ".join((info.description or "").split())
    return Row(
        key=name,
        default="required" if info.is_required() else "",
        allowed=kind,
        description=f"{text} Keys: {where} below.".strip(),
        model=RetrievalConfig,
        field=name,
    )


def _table(rows: Sequence[Row]) -> list[str]:
    rebuild = any(r.rebuild is not None for r in rows)
    head = ["key", "default", "allowed", *(["rebuild"] if rebuild else []), "description"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r.key}`", r.default, r.allowed]
        if rebuild:
            cells.append("" if r.rebuild is None else ("yes" if r.rebuild else "no"))
        cells.append(r.description)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _docstring(model: type) -> str:
    """The class's own docstring (not an inherited one), in markdown: RST ``code`` -> `code`."""
    doc = model.__dict__.get("__doc__")
    if not doc:
        return ""
    return re.sub(r"``(.+?)``", r"`\1`", inspect.cleandoc(doc), flags=re.DOTALL)


def _default(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    """A value as it would be written in the YAML file (flow style)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, int | str | Path):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml(k)}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, BaseModel):
        return _yaml(value.model_dump())
    return repr(value)


def _allowed(info: FieldInfo) -> str:
    return _type_text(info.annotation, list(info.metadata))


def _type_text(tp: Any, metadata: Sequence[Any] = ()) -> str:
    """What validation accepts for ``tp`` with the constraints in ``metadata``, in words."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_text(args[0], [*args[1:], *metadata])
    if origin is typing.Union or origin is types.UnionType:
        kept = [a for a in args if a is not type(None)]
        inner = (
            _type_text(kept[0], metadata)
            if len(kept) == 1
            else " or ".join(_type_text(a) for a in kept)
        )
        return f"{inner}, or null" if len(kept) < len(args) else inner
    if origin is typing.Literal:
        return " / ".join(f"`{_yaml(a)}`" for a in args)
    if origin in (list, tuple, set, frozenset):
        return _constrained(f"list of {_type_text(args[0]) if args else 'values'}", metadata)
    if origin is dict:
        key, value = (_type_text(a) for a in args) if args else ("text", "values")
        return _constrained(f"mapping of {key} to {value}", metadata)
    names = {int: "integer", float: "number", bool: "`true` / `false`", str: "text", Path: "path"}
    if tp is Any:
        return _constrained("any", metadata)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return _constrained("mapping", metadata)
    return _constrained(names.get(tp, getattr(tp, "__name__", str(tp))), metadata)


def _constrained(base: str, metadata: Sequence[Any]) -> str:
    parts = []
    for m in _flat(metadata):
        if isinstance(m, annotated_types.Ge):
            parts.append(f">= {_bound(m.ge)}")
        elif isinstance(m, annotated_types.Gt):
            parts.append(f"> {_bound(m.gt)}")
        elif isinstance(m, annotated_types.Le):
            parts.append(f"<= {_bound(m.le)}")
        elif isinstance(m, annotated_types.Lt):
            parts.append(f"< {_bound(m.lt)}")
        elif isinstance(m, annotated_types.MinLen):
            if m.min_length == 1:
                base = f"non-empty {base}"
            else:
                parts.append(f"at least {m.min_length} long")
        elif isinstance(m, annotated_types.MaxLen):
            parts.append(f"at most {m.max_length} long")
        elif getattr(m, "pattern", None):
            parts.append(f"matching `{m.pattern}`")
    return " ".join([base, " and ".join(parts)]) if parts else base


def _bound(value: Any) -> str:
    """A bound for reading (``1,000,000``), where a default is written as YAML (``1000000``)."""
    if isinstance(value, int | float) and float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return _yaml(value)


def _flat(metadata: Sequence[Any]) -> Iterator[Any]:
    """Constraint objects, with those of a ``Field(...)`` inside ``Annotated`` unpacked."""
    for m in metadata:
        if isinstance(m, FieldInfo):
            yield from _flat(m.metadata)
        else:
            yield m


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a field that holds one (``Model``, ``list[Model]``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) is list:
        (arg,) = typing.get_args(annotation)
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


# -- the README block ----------------------------------------------------------------------------


def replace_block(text: str, block: str | None = None) -> str:
    """``text`` with what lies between ``START`` and ``END`` replaced by ``block`` (by default
    ``yaml_reference()``); ValueError unless each marker occurs once, in that order."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one {START} followed by one {END}")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    body = yaml_reference() if block is None else block
    return f"{head}{START}\n{body}{END}{tail}"


def current_block(text: str) -> str:
    """What the README holds between the markers now (ValueError when they are missing)."""
    replace_block(text, "")  # validates the markers
    return text.split(START)[1].split(END)[0].removeprefix("\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``--write FILE`` rewrites the block in place, ``--check FILE`` exits 1 when it is stale;
    with neither, the reference is printed."""
    parser = argparse.ArgumentParser(
        prog="python -m retrieval.tools.docs", description=__doc__.splitlines()[0]
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, metavar="FILE", help="rewrite the block in FILE")
    group.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE's is stale")
    args = parser.parse_args(argv)
    path: Path | None = args.write or args.check
    if path is None:
        sys.stdout.write(yaml_reference())
        return 0
    try:
        text = path.read_text(encoding="utf-8")
        new = replace_block(text)
    except (OSError, ValueError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{path}: the YAML reference is stale; run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new, encoding="utf-8")
        print(f"{path}: YAML reference rewritten")
    else:
        print(f"{path}: YAML reference already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
