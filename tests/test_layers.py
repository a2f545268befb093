"""The architecture as a test: imports only go down the layers, and serving never loads the
offline stack (the event reader, Arrow, progress bars, evaluation, the CLI)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import its own layer or any lower one, at module level.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "ground",
        (
            "retrieval.errors",
            "retrieval.ids",
            "retrieval.types",
            "retrieval.redact",
            "retrieval.version",
            "retrieval.kernels",
            "retrieval.build_kernels",
            "retrieval.metrics",
        ),
    ),
    ("contract", ("sources.base", "sources.vector_index", "sources.history", "retrieval.config")),
    ("state and formats", ("retrieval.artifacts", "retrieval.store")),
    ("sources and blender", ("sources", "blender")),
    ("online", ("retrieval.online",)),
    ("offline", ("retrieval.offline",)),
    ("evaluation", ("retrieval.evaluation",)),
    ("serving over HTTP", ("retrieval.serve",)),
    ("tools", ("retrieval.tools", "retrieval.testing")),
]


def layer_of(module: str) -> int | None:
    """The layer of a module of ours (longest matching prefix), None for third-party ones."""
    best: tuple[int, int] | None = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def top_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports executed when the module loads: not those inside functions or TYPE_CHECKING."""
    found: list[tuple[int, str]] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((node.lineno, node.module))
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)

    visit(tree.body)
    return found


def our_modules() -> list[Path]:
    return sorted(
        p
        for pkg in ("retrieval", "sources", "blender")
        for p in (ROOT / pkg).rglob("*.py")
        if p.name != "__init__.py" or p.parent.name not in ("retrieval", "sources", "blender")
    )


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in our_modules() if layer_of(module_name(p)) is None]
    assert not missing, f"add these to LAYERS: {missing}"


def test_imports_only_go_down():
    upward = []
    for path in our_modules():
        me = module_name(path)
        mine = layer_of(me)
        assert mine is not None
        for line, target in top_level_imports(ast.parse(path.read_text())):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                upward.append(
                    f"{path.relative_to(ROOT)}:{line} ({LAYERS[mine][0]}) imports {target} "
                    f"({LAYERS[theirs][0]})"
                )
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import():
    tree = ast.parse("from retrieval.offline.events import read_events\nimport numpy\n")
    imports = top_level_imports(tree)
    assert [t for _, t in imports] == ["retrieval.offline.events", "numpy"]
    assert layer_of("retrieval.offline.events") > layer_of("retrieval.online.retriever")  # type: ignore[operator]
    lazy = ast.parse("def f():\n    import retrieval.tools.cli\nif TYPE_CHECKING:\n    import x\n")
    assert top_level_imports(lazy) == []


@pytest.fixture(scope="module")
def every_source_built(tmp_path_factory):
    from retrieval.tools.cli import main
    from retrieval.tools.synth import synthesize

    root = tmp_path_factory.mktemp("layers")
    log = root / "log.parquet"
    synthesize(log, n_items=600, n_users=150, n_events=3000, seed=2)
    cfg = root / "c.yaml"
    cfg.write_text(
        textwrap.dedent(
            """
            k: 50
            artifacts: build
            blend: {fallback: popular}
            sources:
              - {name: covisit, kind: covisitation}
              - {name: itemcf, kind: itemcf}
              - {name: ann, kind: ann, params: {factors: 8, iterations: 3}}
              - {name: popular, kind: popularity}
              - {name: recent, kind: recent}
            """
        )
    )
    assert main(["build", str(cfg), "--events", str(log)]) == 0
    return cfg


def test_serving_never_imports_the_offline_stack(every_source_built):
    script = textwrap.dedent(
        f"""
        import sys
        from retrieval import Retriever
        with Retriever.from_yaml({str(every_source_built)!r}) as r:
            r.record(10000000001, 1000001)
            result = r.blend(user_id=10000000001)
            assert all(rep.status.value in ("ok", "skipped") for rep in result.reports), result
        banned = ("retrieval.offline", "retrieval.evaluation", "retrieval.tools", "pyarrow",
                  "tqdm", "implicit", "sparse_dot_topn")
        print(sorted(m for m in sys.modules if m.split(".")[0] in banned
                     or any(m.startswith(b + ".") or m == b for b in banned)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout
