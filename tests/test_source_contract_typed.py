"""The typed source contract: ``Source[P]``, the kind registry, the ``VectorIndex`` protocol."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from retrieval.errors import InputError
from retrieval.types import Deadline, Request
from sources import base
from sources.base import (
    BUILTIN_KINDS,
    NoParams,
    Source,
    SourceContext,
    SourceParams,
    UnknownKindError,
    known_kinds,
    register,
    resolve_kind,
)
from sources.vector_index import VectorIndex
from tests.toy_sources import ListParams, ListSource

REPO = Path(__file__).resolve().parents[1]

BUILTIN_CLASSES = {
    "ann": "AnnSource",
    "covisitation": "CovisitationSource",
    "itemcf": "ItemCFSource",
    "popularity": "PopularitySource",
    "recent": "RecentSource",
}


# ---------------------------------------------------------------------------------- Source[P]


class PickParams(SourceParams):
    items: list[int] = []


class Picks(Source[PickParams]):
    """A typed source that leaves ``Params`` to its type argument."""

    def retrieve(self, request: Request, k: int, deadline: Deadline) -> Any:
        ids = np.asarray(self.params.items[:k], dtype=np.int64)
        return ids, np.ones(ids.size, dtype=np.float32)


def test_wrong_params_raise_a_type_error_naming_the_source_and_both_classes() -> None:
    from sources.popularity import PopularityParams
    from sources.recent import RecentParams, RecentSource

    with pytest.raises(TypeError) as info:
        RecentSource("mine", PopularityParams(), SourceContext())  # type: ignore[arg-type]
    msg = str(info.value)
    assert "'mine'" in msg and "RecentSource" in msg
    assert "RecentParams" in msg and "PopularityParams" in msg
    assert RecentSource("mine", RecentParams(), SourceContext()).params == RecentParams()

    with pytest.raises(TypeError, match=r"Picks.*PickParams.*ListParams"):
        Picks("p", ListParams(), SourceContext())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ListSource.*ListParams.*NoParams"):
        ListSource("l", NoParams(), SourceContext())


def test_params_follow_the_type_argument_and_must_agree_with_it() -> None:
    assert Picks.Params is PickParams
    got, _ = Picks("p", PickParams(items=[3, 1]), SourceContext()).retrieve(
        Request(), 5, Deadline.in_ms(100)
    )
    assert got.tolist() == [3, 1]

    class Narrower(PickParams):
        pass

    class Sub(Source[PickParams]):  # a subclass of the declared params is fine
        Params = Narrower

        def retrieve(self, request: Request, k: int, deadline: Deadline) -> Any:
            raise NotImplementedError

    assert Sub.Params is Narrower
    with pytest.raises(TypeError, match=r"Params is .*ListParams.*declared over .*PickParams"):

        class Mismatch(Source[PickParams]):
            Params = ListParams

            def retrieve(self, request: Request, k: int, deadline: Deadline) -> Any:
                raise NotImplementedError


def test_sources_written_the_old_way_still_work() -> None:
    """No type argument, ``Params`` as a class attribute, ``self.p`` of their own: unchanged."""
    source = ListSource("old", ListParams(items=[5, 6]), SourceContext())
    assert source.p is source.params
    assert source.retrieve(Request(), 1, Deadline.in_ms(100))[0].tolist() == [5]
    assert resolve_kind("tests.toy_sources:ListSource") is ListSource

    class Undeclared(Source):  # never said what params it takes: gets what it is given, as before
        def retrieve(self, request: Request, k: int, deadline: Deadline) -> Any:
            raise NotImplementedError

    assert Undeclared.Params is NoParams
    assert isinstance(Undeclared("u", SourceParams(), SourceContext()).params, SourceParams)


# ---------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("kind", sorted(BUILTIN_KINDS))
def test_every_builtin_kind_resolves_through_the_registry(kind: str) -> None:
    cls = resolve_kind(kind)
    assert cls is base._registry[kind]
    assert cls.__name__ == BUILTIN_CLASSES[kind] and cls.__module__ == BUILTIN_KINDS[kind]
    assert cls.kind == kind
    assert isinstance(cls.Params, type) and issubclass(cls.Params, SourceParams)
    assert cls.Params is not NoParams and base._declared_params(cls) is cls.Params


def test_known_kinds_and_unknown_kind_errors() -> None:
    assert set(BUILTIN_CLASSES) == set(BUILTIN_KINDS) <= set(known_kinds())
    with pytest.raises(UnknownKindError) as info:
        resolve_kind("annn")
    assert isinstance(info.value, InputError) and isinstance(info.value, LookupError)
    assert isinstance(info.value, ValueError)
    for kind in BUILTIN_KINDS:
        assert kind in str(info.value)
    assert "import path" in str(info.value)
    with pytest.raises(UnknownKindError, match=r"cannot import module 'no_such_pkg\.mod'"):
        resolve_kind("no_such_pkg.mod:Thing")
    with pytest.raises(UnknownKindError, match="not a candidate source"):
        resolve_kind("tests.toy_sources:ListParams")


def test_a_builtin_name_cannot_be_taken_over_but_new_names_register() -> None:
    with pytest.raises(ValueError, match="built-in kind"):
        register("ann")(Picks)
    assert resolve_kind("ann").__module__ == "sources.ann"
    try:
        assert register("typed_picks_test")(Picks) is Picks
        assert resolve_kind("typed_picks_test") is Picks and Picks.kind == "typed_picks_test"
        assert "typed_picks_test" in known_kinds()
    finally:
        base._registry.pop("typed_picks_test", None)
        Picks.kind = ""


def test_importing_the_contract_does_not_import_heavy_libraries() -> None:
    code = (
        "import json, sys\n"
        "import sources.base as b\n"
        "b.known_kinds()\n"
        "heavy = {'annoy', 'faiss', 'implicit', 'pyarrow'}\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


# ------------------------------------------------------------------------------ VectorIndex

N, DIMS, K = 300, 8, 10


def _data(metric: str) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    rng = np.random.default_rng({"angular": 1, "dot": 2, "euclidean": 3}[metric])
    x = (rng.normal(size=(N, DIMS)) * rng.lognormal(0, 0.3, (N, 1))).astype(np.float32)
    q = rng.normal(size=DIMS).astype(np.float32)
    if metric == "angular":
        q /= np.linalg.norm(q)  # the ann source hands the index a unit query under angular
    return x, q


def _oracle(
    x: npt.NDArray[np.float32], q: npt.NDArray[np.float32], metric: str, k: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Brute force on the ann source's scale: cosine, inner product, minus the distance."""
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "angular":
        s = (x64 / np.linalg.norm(x64, axis=1, keepdims=True)) @ q64
    elif metric == "dot":
        s = x64 @ q64
    else:
        s = -np.linalg.norm(x64 - q64, axis=1)
    top = np.argsort(-s, kind="stable")[:k]
    return top, s[top]


def _exact(tmp_path: Path, x: npt.NDArray[np.float32], metric: str) -> VectorIndex:
    from sources.ann_exact import ExactSearch

    return ExactSearch(x, metric, tmp_path / "item_factors.npy")


def _faiss(tmp_path: Path, x: npt.NDArray[np.float32], metric: str) -> VectorIndex:
    pytest.importorskip("faiss")
    from sources.ann_faiss import INDEX, FaissIVF, build_ivf

    path = tmp_path / INDEX
    built = build_ivf(x, metric, path, nlist=4, storage="flat", balance=False, seed=0)
    meta = {"dims": DIMS, "n_items": N, "metric": metric, **built}
    return FaissIVF(path, meta, x, nprobe=built["nlist"])  # every list probed: exact


def _annoy(tmp_path: Path, x: npt.NDArray[np.float32], metric: str) -> VectorIndex:
    from sources.ann_annoy import INDEX, AnnoySearch, build_annoy

    path = tmp_path / INDEX
    built, _ = build_annoy(x, metric, path, n_trees=10, seed=0)
    meta = {"dims": DIMS, "n_items": N, "metric": metric, **built}
    return AnnoySearch(path, meta, x, n_trees=10, search_k=100 * N)  # every leaf visited: exact


@pytest.mark.parametrize("metric", ["angular", "dot", "euclidean"])
@pytest.mark.parametrize("backend", ["exact", "faiss", "annoy"])
def test_each_vector_index_is_exact_on_a_small_set(
    tmp_path: Path, backend: str, metric: str
) -> None:
    x, q = _data(metric)
    np.save(tmp_path / "item_factors.npy", x)
    index = {"exact": _exact, "faiss": _faiss, "annoy": _annoy}[backend](tmp_path, x, metric)
    assert isinstance(index, VectorIndex)
    assert index.n_items == N
    want_rows, want_scores = _oracle(x, q, metric, K)
    for deadline in (None, Deadline.in_ms(1000)):
        rows, scores = index.search(q, K, deadline)
        assert rows.dtype == np.int64 and scores.dtype == np.float32
        assert rows.shape == scores.shape == (K,)
        assert sorted(rows.tolist()) == sorted(want_rows.tolist())
        assert np.all(np.diff(scores) <= 1e-6), "best first"
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
    index.close()


def test_the_protocol_is_structural() -> None:
    class Stub:
        n_items = 0

        def search(self, query: Any, k: int, deadline: Any = None) -> Any:
            return np.empty(0, np.int64), np.empty(0, np.float32)

        def close(self) -> None:
            pass

    class NoClose:
        n_items = 0

        def search(self, query: Any, k: int, deadline: Any = None) -> Any:
            raise NotImplementedError

    assert isinstance(Stub(), VectorIndex)
    assert not isinstance(NoClose(), VectorIndex)
