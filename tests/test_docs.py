"""The README's YAML reference is generated from the config models and kept current, and every
config key is documented where it is defined (``Field(description=...)``)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from pydantic import BaseModel

import retrieval.config
from retrieval.config import RetrievalConfig
from retrieval.store.base import Store
from retrieval.tools import docs
from sources.base import NoParams, Source, SourceParams, StoreView

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def test_the_readme_block_is_what_the_models_render_now() -> None:
    text = README.read_text(encoding="utf-8")
    assert docs.current_block(text) == docs.yaml_reference(), (
        "README.md's YAML reference is stale: run `python -m retrieval.tools.docs --write "
        "README.md`"
    )


def test_the_reference_covers_every_key() -> None:
    reference = docs.yaml_reference()
    for row in docs.config_rows():
        assert f"| `{row.key}` |" in reference
    for kind, params in docs.builtin_params():
        assert f"#### `kind: {kind}`" in reference
        for name in params.model_fields:
            assert f"| `{name}` |" in reference


def test_the_walk_reaches_every_model_of_the_config_module() -> None:
    defined = {
        obj
        for obj in vars(retrieval.config).values()
        if inspect.isclass(obj)
        and issubclass(obj, BaseModel)
        and obj.__module__ == "retrieval.config"
        and obj.model_fields
    }
    assert defined <= set(docs.config_models())
    assert {kind for kind, _ in docs.builtin_params()} == {
        "ann",
        "covisitation",
        "itemcf",
        "popularity",
        "recent",
    }


def test_every_field_has_a_description() -> None:
    """Config and built-in params alike: no allow-list, a new field comes with its description."""
    assert docs.undocumented() == [], "fields without Field(description=...)"


def test_every_config_model_has_its_own_docstring() -> None:
    for model in docs.config_models():
        assert (model.__dict__.get("__doc__") or "").strip(), model.__qualname__


def test_every_builtin_params_model_has_its_own_docstring() -> None:
    """The reference prints it above the kind's table: a kind must not come without one."""
    for kind, params in docs.builtin_params():
        assert (params.__dict__.get("__doc__") or "").strip(), f"{kind}: {params.__qualname__}"


def test_inherited_params_default_to_the_config_wide_value() -> None:
    """The reference says a kind's ``event_weights`` defaults to ``events.weights``: it does."""
    weights = {"view": 0.5, "buy": 9.0}
    config = RetrievalConfig.load(
        {
            "events": {"weights": weights},
            "sources": [{"name": kind, "kind": kind} for kind, _ in docs.builtin_params()],
        }
    )
    for sc in config.sources:
        for name, inherited in docs.INHERITED.items():
            if name in sc.source_class.Params.model_fields:
                assert inherited == "events.weights"
                assert getattr(sc.resolved_params, name) == weights, sc.kind


def test_the_store_protocol_documents_every_method() -> None:
    # Its own methods and those it declares through StoreView (the sources' part of it).
    methods = [
        name
        for cls in (Store, StoreView)
        for name, fn in vars(cls).items()
        if callable(fn) and not name.startswith("_")
    ]
    assert {"record", "fetch", "history", "popular", "cache_get", "cache_set"} <= set(methods)
    for name in methods:
        assert (getattr(Store, name).__doc__ or "").strip(), f"Store.{name} has no docstring"


@pytest.mark.parametrize("cls", [Source, StoreView, SourceParams, NoParams])
def test_the_source_contract_documents_every_public_method(cls: type) -> None:
    """What a user's own source implements or is handed (``sources.base``) is documented."""
    assert (cls.__dict__.get("__doc__") or "").strip(), f"{cls.__qualname__} has no docstring"
    for name, fn in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        fn = fn.__func__ if isinstance(fn, classmethod | staticmethod) else fn
        # defined in the class itself (typing.Protocol adds an ``__init__`` of its own)
        if inspect.isfunction(fn) and fn.__qualname__ == f"{cls.__qualname__}.{name}":
            assert (fn.__doc__ or "").strip(), f"{cls.__qualname__}.{name} has no docstring"


def test_write_and_check_rewrite_only_the_block(tmp_path: Path) -> None:
    stale = f"# Title\n\nprose before\n\n{docs.START}\nold table\n{docs.END}\n\nprose after\n"
    path = tmp_path / "README.md"
    path.write_text(stale, encoding="utf-8")
    assert docs.main(["--check", str(path)]) == 1
    assert docs.main(["--write", str(path)]) == 0
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\nprose before\n\n")
    assert text.endswith(f"{docs.END}\n\nprose after\n")
    assert docs.current_block(text) == docs.yaml_reference()
    assert docs.main(["--check", str(path)]) == 0
    assert docs.replace_block(text) == text


@pytest.mark.parametrize(
    "text",
    ["no markers", f"{docs.END}\n{docs.START}\n", f"{docs.START}\n{docs.START}\n{docs.END}\n"],
)
def test_missing_or_misordered_markers_are_refused(text: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected one"):
        docs.replace_block(text)
    path = tmp_path / "README.md"
    path.write_text(text, encoding="utf-8")
    assert docs.main(["--write", str(path)]) == 2
    assert path.read_text(encoding="utf-8") == text
