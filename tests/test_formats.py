"""Golden files of every on-disk format version, read with the current code (issue 12, item 6).

``tests/fixtures/formats/`` keeps one directory per format version ever written (made by its
``make_fixtures.py``, run only when a version is bumped): a whole tiny build (manifest,
co-visitation, item-CF, the ann sidecar of each backend, popularity), ``calibration.json``,
Redis neighbour rows and result-cache values, each with an ``expected.json`` of what the code
read from them when they were written. Every fixture is read again here and must give exactly
that, so a change that breaks reading an existing format, or reads it differently, fails.

A fixture of the *current* version must be read as recorded. One of an *older* version must be
read as recorded too, or (while ``OLD_VERSIONS_MAY_BE_REFUSED``) be refused with the format's
own error naming the version: every reader here reads only its current version and says
"rebuild", which is a clean refusal, never a silent misreading. A build of a kind whose
``build_version`` was bumped since must be refused ("built with other params"). A file of a
*future* version (the current one plus one) must be refused the same way.

The ``observe_*`` functions define how each format is read; ``make_fixtures.py`` imports them to
write ``expected.json``, so "what was read then" and "what is read now" are one definition.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from blender.calibration import CALIBRATION_FILE, Calibration, RankCurve
from blender.calibration import FORMAT_VERSION as CALIBRATION_VERSION
from retrieval.artifacts import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ArtifactError,
    IdMap,
    file_sum,
    open_artifacts,
    verify_build,
)
from retrieval.errors import InputError
from retrieval.online.retriever import Retriever
from retrieval.store import cache as cache_mod
from retrieval.store.cache import CacheFormatError, decode_result, encode_result
from retrieval.store.rows import ROW_FORMAT_VERSION, RowFormatError, pack_row, unpack_row
from retrieval.types import CandidateSet, Deadline, SourceReport, SourceStatus
from sources import ann as ann_mod
from sources import popularity as popularity_mod
from sources.ann import AnnParams
from sources.base import SkipSource, Source
from sources.covisitation import CovisitationParams
from sources.itemcf import ItemCFParams
from sources.popularity import PopularityParams
from sources.recent import RecentParams

FIXTURES = Path(__file__).parent / "fixtures" / "formats"
# The readers' policy today: a file of an older format version is refused ("rebuild"), not
# converted. Set False once old versions must keep loading (then a refusal fails the test).
OLD_VERSIONS_MAY_BE_REFUSED = True
_MAX_FIXTURE_BYTES = 200_000  # per fixture directory (annoy and faiss index files included)
# Scores are float32 computed again at load (ALS re-solves, dot products): other BLAS builds
# may differ in the last bits, so scores compare with a tolerance and near-tied ids as sets.
RTOL, ATOL = 1e-4, 1e-6
_SOURCE_DEADLINE_MS = 60_000.0  # generous: a second hop skipped for lack of time changes lists


def current_versions() -> dict[str, int]:
    """Every on-disk format's version as the current code writes it."""
    return {
        "manifest": FORMAT_VERSION,
        "ann": ann_mod.FORMAT_VERSION,
        "popularity": popularity_mod.FORMAT_VERSION,
        "calibration": CALIBRATION_VERSION,
        "row": ROW_FORMAT_VERSION,
        "cache": cache_mod._VERSION,  # no public name: the module keeps it private
    }


def build_versions() -> dict[str, int]:
    """Each built-in kind's ``build_version``: a bump refuses older builds of that kind."""
    params = {
        "covisitation": CovisitationParams,
        "itemcf": ItemCFParams,
        "ann": AnnParams,
        "popularity": PopularityParams,
        "recent": RecentParams,
    }
    return {kind: int(getattr(cls, "build_version", 1)) for kind, cls in params.items()}


def _fixtures(prefix: str) -> list[Path]:
    return sorted(
        p for p in FIXTURES.glob(f"{prefix}*") if p.is_dir() and (p / "expected.json").is_file()
    )


def _expected(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / "expected.json").read_text(encoding="utf-8"))
    return data


def _params(prefix: str) -> list[Any]:
    return [pytest.param(p, id=p.name) for p in _fixtures(prefix)]


# ---- observation: how each format is read ---------------------------------------------------


def _floats(a: Any) -> list[float]:
    return [float(x) for x in np.asarray(a, dtype=np.float32).tolist()]


def _ids(a: Any) -> list[Any]:
    arr = np.asarray(a)
    return [str(x) for x in arr.tolist()] if arr.dtype.kind == "U" else arr.tolist()


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file below ``root``: size and SHA-256 (to prove loading writes nothing)."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            out[path.relative_to(root).as_posix()] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def _digest(a: Any) -> dict[str, Any]:
    """An array as read: dtype, shape and the SHA-256 of its little-endian bytes."""
    arr = np.asarray(a)
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return {
        "dtype": arr.dtype.str.lstrip("<>|="),
        "shape": list(arr.shape),
        "sha256": hashlib.sha256(le.tobytes()).hexdigest(),
    }


def _csr(csr: Any) -> dict[str, Any]:
    return {
        "indptr": np.asarray(csr.indptr).tolist(),
        "indices": _digest(csr.indices),
        "scores": _digest(csr.scores),
    }


def _describe(src: Source) -> dict[str, Any]:
    """What a loaded source read from its artifacts (beyond its answers): the ann sidecar and
    index class, popularity.json and segments.json, every CSR (its arrays as digests)."""
    kind = type(src).__name__
    if kind == "AnnSource":
        return {
            "meta": dict(src.meta),  # type: ignore[attr-defined]
            "index": type(src.index).__name__,  # type: ignore[attr-defined]
            "item_ids": _ids(src.item_ids.values),  # type: ignore[attr-defined]
            "item_factors": _digest(src.item_vectors()),  # type: ignore[attr-defined]
        }
    if kind == "PopularitySource":
        return {
            "meta": dict(src.meta),  # type: ignore[attr-defined]
            "segment_rows": src.segment_rows,  # type: ignore[attr-defined]
            "csr": _csr(src.csr),  # type: ignore[attr-defined]
        }
    csr = getattr(src, "csr", None)
    if csr is not None:
        return {"csr": _csr(csr), "items": _ids(src.items.values)}  # type: ignore[attr-defined]
    return {}


def _request_kwargs(req: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "user_id": req.get("user_id"),
        "history": list(req.get("history", ())),
        "seed_items": list(req.get("seed_items", ())),
        "context": dict(req.get("context", {})),
        "k": int(req["k"]),
    }


def _answers(retriever: Retriever, src: Source, requests: Sequence[Mapping[str, Any]]) -> Any:
    out: dict[str, Any] = {}
    for req in requests:
        request = retriever.request(**_request_kwargs(req))
        try:
            ids, scores = src.retrieve(request, int(req["k"]), Deadline.in_ms(_SOURCE_DEADLINE_MS))
        except SkipSource:
            out[req["name"]] = {"skipped": True}
            continue
        out[req["name"]] = {"ids": _ids(ids), "scores": _floats(scores)}
    return out


def _blend(retriever: Retriever, requests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out = {}
    for req in requests:
        result = retriever.blend(**_request_kwargs(req))
        out[req["name"]] = {
            "ids": _ids(result.item_ids),
            "scores": _floats(result.scores),
            "ranks": np.asarray(result.ranks).tolist(),
            "statuses": {r.name: r.status.value for r in result.reports},
            "backfilled": result.backfilled,
        }
    return out


@contextlib.contextmanager
def _source_config(root: Path, name: str) -> Iterator[Path]:
    """The fixture's config cut down to source ``name`` (so each source loads, or is refused,
    on its own), in a temporary directory, its ``artifacts`` pointing at ``root/build``."""
    data = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8"))
    data["sources"] = [s for s in data["sources"] if s["name"] == name]
    data["artifacts"] = str((root / data["artifacts"]).resolve())
    if data.get("blend", {}).get("fallback") != name:
        data.setdefault("blend", {})["fallback"] = None
    with tempfile.TemporaryDirectory(prefix="format-config-") as tmp:
        path = Path(tmp) / f"config-{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        yield path


def source_kinds(root: Path) -> dict[str, str]:
    """The fixture config's sources, name -> kind, in order."""
    data = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8"))
    return {s["name"]: s["kind"] for s in data["sources"]}


def source_names(root: Path) -> list[str]:
    return list(source_kinds(root))


def observe_manifest(root: Path) -> dict[str, Any]:
    """The build's manifest through ``open_artifacts`` (every checksum and stamp verified)."""
    build = root / "build"
    manifest = open_artifacts(build)  # verify=True: sizes, SHA-256, BUILD_ID stamps, id maps
    return {
        "format_version": manifest.format_version,
        "package_version": manifest.package_version,
        "build_id": manifest.build_id,
        "counts": dict(manifest.counts),
        "files": sorted(manifest.files),
        "verified_bytes": verify_build(build, manifest),
        "sources": {
            name: {
                "kind": e.kind,
                "params_hash": e.params_hash,
                "build_id": e.build_id,
                "files": sorted(e.files),
                "id_maps": sorted(e.id_maps),
            }
            for name, e in sorted(manifest.sources.items())
        },
        "id_maps": {
            "items": _ids(IdMap.load(build / "ids" / "items.npy").values),
            "users": _ids(IdMap.load(build / "ids" / "users.npy").values),
        },
    }


def observe_source(root: Path, name: str, requests: Sequence[Mapping[str, Any]]) -> Any:
    """Source ``name`` loaded alone through a Retriever: what it read and its answers."""
    with _source_config(root, name) as config, Retriever.from_yaml(config) as retriever:
        (src,) = retriever.sources
        return {
            "class": type(src).__name__,
            "loaded": _describe(src),
            "answers": _answers(retriever, src, requests),
        }


def observe_blend(root: Path, requests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Every source at once, through the fixture's own ``config.yaml``."""
    with Retriever.from_yaml(root / "config.yaml") as retriever:
        return _blend(retriever, requests)


def observe_build(root: Path, requests: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {
        "manifest": observe_manifest(root),
        "sources": {name: observe_source(root, name, requests) for name in source_names(root)},
        "blend": observe_blend(root, requests),
    }


def observe_calibration(directory: Path) -> dict[str, Any]:
    path = directory / CALIBRATION_FILE
    names = sorted(json.loads(path.read_text(encoding="utf-8"))["curves"])
    cal = Calibration.load(path, names)
    return {
        "users": cal.users,
        "curves": {
            n: {"edges": list(c.edges), "p": list(c.p), "dense": c.dense(64).tolist()}
            for n, c in sorted(cal.curves.items())
        },
    }


def observe_rows(directory: Path) -> dict[str, Any]:
    return {"rows": {p.stem: _row(p.read_bytes()) for p in sorted(directory.glob("*.bin"))}}


def _row(blob: bytes) -> dict[str, Any]:
    ids, scores = unpack_row(blob)
    return {
        "id_kind": blob[5],  # the header's: 1 int64, 2 utf-8 (an empty row reads as int64)
        "dtype": ids.dtype.kind,
        "ids": _ids(ids),
        "scores": _floats(scores),
    }


def _cache_value(result: CandidateSet) -> dict[str, Any]:
    return {
        "dtype": result.item_ids.dtype.kind,
        "ids": _ids(result.item_ids),
        "scores": _floats(result.scores),
        "source_names": list(result.source_names),
        "ranks": np.asarray(result.ranks).tolist(),
        "ranks_shape": list(np.asarray(result.ranks).shape),
        "reports": [r.to_dict() for r in result.reports],
        "elapsed_ms": result.elapsed_ms,
        "backfilled": result.backfilled,
    }


def observe_cache(directory: Path) -> dict[str, Any]:
    values = {p.stem: decode_result(p.read_bytes()) for p in sorted(directory.glob("*.bin"))}
    return {"values": {name: _cache_value(v) for name, v in values.items()}}


# ---- comparison ------------------------------------------------------------------------------


def assert_ranked(got: Mapping[str, Any], exp: Mapping[str, Any], where: str) -> None:
    """Same list: scores within tolerance, ids equal, except that ids whose expected scores tie
    (within tolerance) may come in any order among themselves."""
    assert got.keys() == exp.keys(), f"{where}: {got} != {exp}"
    if "skipped" in exp:
        return
    g_ids, e_ids = list(got["ids"]), list(exp["ids"])
    assert len(g_ids) == len(e_ids), f"{where}: {len(g_ids)} ids, expected {len(e_ids)}"
    e_scores = np.asarray(exp["scores"], dtype=np.float64)
    np.testing.assert_allclose(got["scores"], e_scores, rtol=RTOL, atol=ATOL, err_msg=where)
    start = 0
    for i in range(1, len(e_ids) + 1):
        tied = i < len(e_ids) and np.isclose(e_scores[i], e_scores[i - 1], rtol=RTOL, atol=ATOL)
        if tied:
            continue
        if i - start == 1:
            assert g_ids[start] == e_ids[start], f"{where}: rank {start}: {g_ids} != {e_ids}"
        else:
            assert sorted(map(str, g_ids[start:i])) == sorted(map(str, e_ids[start:i])), (
                f"{where}: ranks {start}..{i - 1} (tied): {g_ids} != {e_ids}"
            )
        start = i


def _copy(fixture: Path, tmp_path: Path) -> Path:
    dest = tmp_path / fixture.name
    shutil.copytree(fixture, dest, symlinks=False)
    return dest


def _is_refusal(exc: BaseException, *words: str) -> bool:
    text = str(exc)
    return any(w in text for w in words) and "rebuild" in text.lower()


# ---- every fixture, read now ------------------------------------------------------------------


def test_every_current_version_has_a_fixture() -> None:
    """A bumped version needs its golden files (``make_fixtures.py``), beside the old ones."""
    v = current_versions()
    builds = [_expected(p)["versions"] for p in _fixtures("build_")]
    cur = {k: v[k] for k in ("manifest", "ann", "popularity")}
    assert cur in builds, f"no build fixture of versions {cur}: run make_fixtures.py"
    assert any(
        _expected(p)["versions"] == cur and _expected(p)["build_versions"] == build_versions()
        for p in _fixtures("build_")
    ), "no build fixture of the current build_versions: run make_fixtures.py"
    for fmt in ("calibration", "row", "cache"):
        assert (FIXTURES / f"{fmt}-v{v[fmt]}" / "expected.json").is_file(), (
            f"no fixture of {fmt} format version {v[fmt]}: run make_fixtures.py"
        )


@pytest.mark.parametrize("fixture", _params(""))
def test_fixture_is_small_and_self_contained(fixture: Path) -> None:
    total = 0
    for path in [fixture, *fixture.rglob("*")]:
        assert not path.is_symlink(), f"{path}: fixtures hold no links (store resolved builds)"
        if path.is_file():
            total += path.stat().st_size
            if path.suffix in (".json", ".yaml", ".csv"):
                text = path.read_text(encoding="utf-8")
                for leak in ("/tmp/", "/home/", "/work/", "/Users/", "\\Users\\"):
                    assert leak not in text, f"{path}: holds a machine path ({leak!r})"
    assert total < _MAX_FIXTURE_BYTES, f"{fixture.name}: {total:,} bytes; keep it tiny"


@pytest.mark.parametrize("fixture", _params("build_"))
def test_build_fixture_manifest(fixture: Path, tmp_path: Path) -> None:
    """The manifest opens (every file's SHA-256 and every BUILD_ID stamp verified) and records
    what it recorded then; a build of an older manifest version may instead be refused."""
    root = _copy(fixture, tmp_path)
    exp = _expected(fixture)
    assert (root / "build" / MANIFEST_NAME).is_file() and not (root / "build").is_symlink()
    before = _tree(root / "build")
    if exp["versions"]["manifest"] != FORMAT_VERSION:
        try:
            got = observe_manifest(root)
        except ArtifactError as exc:
            assert OLD_VERSIONS_MAY_BE_REFUSED, f"an older build is no longer read: {exc}"
            assert f"format_version {exp['versions']['manifest']}" in str(exc), exc
            return
    else:
        got = observe_manifest(root)
    assert got == exp["manifest"]
    assert _tree(root / "build") == before, "opening a build must not write to it"


def _refusal_allowed(exp: Mapping[str, Any], kind: str) -> str | None:
    """Why this fixture's source of ``kind`` may (or must) be refused now, or None."""
    cur = current_versions()
    if exp["versions"]["manifest"] != cur["manifest"]:
        return "manifest"
    if kind in ("ann", "popularity") and exp["versions"][kind] != cur[kind]:
        return "sidecar"
    if exp["build_versions"].get(kind, 1) != build_versions().get(kind, 1):
        return "build_version"  # must be refused: built with other params
    return None


def _build_cases() -> list[Any]:
    cases = []
    for fixture in _fixtures("build_"):
        for name in source_names(fixture):
            cases.append(pytest.param(fixture, name, id=f"{fixture.name}-{name}"))
    return cases


@pytest.mark.parametrize(("fixture", "name"), _build_cases())
def test_build_fixture_source(fixture: Path, name: str, tmp_path: Path) -> None:
    """Each source loads from the golden build through a Retriever (its config cut from the
    fixture's) and reads its sidecar, CSR and id maps as before: the same answers to the
    recorded requests. Loading writes nothing."""
    root = _copy(fixture, tmp_path)
    exp = _expected(fixture)
    why = _refusal_allowed(exp, source_kinds(root)[name])
    before = _tree(root / "build")
    try:
        got = observe_source(root, name, exp["requests"])
    except ArtifactError as exc:
        if why in ("manifest", "sidecar") and OLD_VERSIONS_MAY_BE_REFUSED:
            assert "format_version" in str(exc), exc
            return
        if why == "build_version":
            assert "other params" in str(exc), exc
            return
        raise
    assert why != "build_version", f"{name}: a bumped build_version must refuse older builds"
    want = exp["sources"][name]
    assert got["class"] == want["class"]
    assert got["loaded"].keys() == want["loaded"].keys()
    for key, value in want["loaded"].items():  # read from files, not computed: exact
        assert got["loaded"][key] == value, f"{name}: {key}"
    assert got["answers"].keys() == want["answers"].keys()
    for req, answer in want["answers"].items():
        assert_ranked(got["answers"][req], answer, f"{fixture.name} {name} {req}")
    assert _tree(root / "build") == before, f"loading {name} must not write to the build"


@pytest.mark.parametrize("fixture", _params("build_"))
def test_build_fixture_blend(fixture: Path, tmp_path: Path) -> None:
    """All sources at once through the fixture's ``config.yaml``: the same blend."""
    root = _copy(fixture, tmp_path)
    exp = _expected(fixture)
    reasons = {_refusal_allowed(exp, kind) for kind in source_kinds(root).values()} - {None}
    may_refuse = "build_version" in reasons or (bool(reasons) and OLD_VERSIONS_MAY_BE_REFUSED)
    before = _tree(root / "build")
    try:
        got = observe_blend(root, exp["requests"])
    except ArtifactError as exc:
        assert may_refuse, f"a build of the current versions was refused: {exc}"
        assert "format_version" in str(exc) or "other params" in str(exc), exc
        return
    assert "build_version" not in reasons, "a bumped build_version must refuse older builds"
    for req, want in exp["blend"].items():
        where = f"{fixture.name} blend {req}"
        assert got[req]["statuses"] == want["statuses"], where
        assert got[req]["backfilled"] == want["backfilled"], where
        assert_ranked(
            {"ids": got[req]["ids"], "scores": got[req]["scores"]},
            {"ids": want["ids"], "scores": want["scores"]},
            where,
        )
        if got[req]["ids"] == want["ids"]:  # no near-tie swapped: provenance is the same too
            assert got[req]["ranks"] == want["ranks"], where
    assert _tree(root / "build") == before


@pytest.mark.parametrize("fixture", _params("calibration-v"))
def test_calibration_fixture(fixture: Path) -> None:
    exp = _expected(fixture)
    version = exp["versions"]["calibration"]
    assert fixture.name == f"calibration-v{version}"
    try:
        got = observe_calibration(fixture)
    except (InputError, ArtifactError) as exc:  # the JSON readers moved to ArtifactError
        if version == CALIBRATION_VERSION or not OLD_VERSIONS_MAY_BE_REFUSED:
            raise
        assert re.search(rf"calibration format(_version)? {version}\b", str(exc)), exc
        return
    assert got == {"users": exp["users"], "curves": exp["curves"]}


@pytest.mark.parametrize("fixture", _params("row-v"))
def test_row_fixture(fixture: Path) -> None:
    """Each row reads as recorded and, at the current version, the writer still writes its
    very bytes (the layout is fixed by the version: 12-byte header, then the arrays)."""
    exp = _expected(fixture)
    version = exp["versions"]["row"]
    assert fixture.name == f"row-v{version}"
    blobs = {p.stem: p.read_bytes() for p in sorted(fixture.glob("*.bin"))}
    assert sorted(blobs) == sorted(exp["rows"])
    for name, blob in blobs.items():
        row = exp["rows"][name]
        magic, found, kind, pad, n = struct.unpack_from("<4sBBHI", blob)  # the 12-byte header
        header = (magic, found, kind, pad, n)
        assert header == (b"CRNR", version, row["id_kind"], 0, len(row["ids"])), name
        try:
            got = _row(blob)
        except RowFormatError as exc:
            if version == ROW_FORMAT_VERSION or not OLD_VERSIONS_MAY_BE_REFUSED:
                raise
            assert f"row format version {version}" in str(exc), exc
            continue
        assert got == row, name
        if version == ROW_FORMAT_VERSION:
            ids = np.asarray(row["ids"], dtype=np.int64 if kind == 1 else str)
            assert pack_row(ids, np.asarray(row["scores"])) == blob, name


@pytest.mark.parametrize("fixture", _params("cache-v"))
def test_cache_fixture(fixture: Path) -> None:
    """Each cached result decodes as recorded and, at the current version, encodes back to the
    same layout (header fields equal, arrays byte for byte)."""
    exp = _expected(fixture)
    version = exp["versions"]["cache"]
    assert fixture.name == f"cache-v{version}"
    blobs = {p.stem: p.read_bytes() for p in sorted(fixture.glob("*.bin"))}
    assert sorted(blobs) == sorted(exp["values"])
    head = struct.Struct("<4sBI")
    for name, blob in blobs.items():
        assert head.unpack_from(blob)[:2] == (b"CRCS", version), name
        try:
            result = decode_result(blob)
        except CacheFormatError as exc:
            if version == cache_mod._VERSION or not OLD_VERSIONS_MAY_BE_REFUSED:
                raise
            assert f"version {version}" in str(exc), exc
            continue
        assert _cache_value(result) == exp["values"][name], name
        if version != cache_mod._VERSION:
            continue
        again = encode_result(result)
        n1, n2 = head.unpack_from(blob)[2], head.unpack_from(again)[2]
        assert head.unpack_from(again)[:2] == (b"CRCS", version), name
        h1 = json.loads(blob[head.size : head.size + n1])
        h2 = json.loads(again[head.size : head.size + n2])
        assert h1 == h2, name
        assert blob[head.size + n1 :] == again[head.size + n2 :], name


# ---- a future version is refused, never misread -------------------------------------------------


def _current_build(tmp_path: Path) -> Path:
    cur = current_versions()
    for fixture in _fixtures("build_"):
        exp = _expected(fixture)
        if exp["versions"] == {k: cur[k] for k in ("manifest", "ann", "popularity")}:
            return _copy(fixture, tmp_path)
    pytest.fail("no build fixture of the current versions: run make_fixtures.py")


def _reseal(build: Path, source: str, rel: str) -> None:
    """Record a changed file's new checksum in the manifest, so the format check (not the
    checksum) is what meets it."""
    path = build / MANIFEST_NAME
    raw = json.loads(path.read_text(encoding="utf-8"))
    fs = file_sum(build / source / rel)
    raw["sources"][source]["files"][rel] = {"size": fs.size, "sha256": fs.sha256}
    path.write_text(json.dumps(raw, indent=2), encoding="utf-8")


def test_future_manifest_version_is_refused(tmp_path: Path) -> None:
    root = _current_build(tmp_path)
    path = root / "build" / MANIFEST_NAME
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ArtifactError) as err:
        open_artifacts(root / "build")
    assert _is_refusal(err.value, f"format_version {FORMAT_VERSION + 1}")
    assert f"reads format_version {FORMAT_VERSION}" in str(err.value)
    with pytest.raises(ArtifactError, match=f"format_version {FORMAT_VERSION + 1}"):
        Retriever.from_yaml(root / "config.yaml")


def _first_source(root: Path, kind: str, backend: str | None = None) -> str:
    exp = _expected(root)
    for name, entry in exp["sources"].items():
        meta = entry["loaded"].get("meta", {})
        if exp["manifest"]["sources"].get(name, {}).get("kind") == kind and (
            backend is None or meta.get("backend") == backend
        ):
            return name
    pytest.fail(f"no {kind} source {backend or ''} in the build fixture")


@pytest.mark.parametrize("backend", ["exact", "faiss", "annoy"])
def test_future_ann_sidecar_version_is_refused(tmp_path: Path, backend: str) -> None:
    root = _current_build(tmp_path)
    name = _first_source(root, "ann", backend)
    sidecar = root / "build" / name / ann_mod.SIDECAR
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    meta["format_version"] = ann_mod.FORMAT_VERSION + 1
    sidecar.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    _reseal(root / "build", name, ann_mod.SIDECAR)
    open_artifacts(root / "build")  # the checksums match: the sidecar's version is the problem
    with pytest.raises(ArtifactError) as err, _source_config(root, name) as config:
        Retriever.from_yaml(config)
    assert _is_refusal(err.value, f"format_version {ann_mod.FORMAT_VERSION + 1}"), err.value


def test_future_popularity_version_is_refused(tmp_path: Path) -> None:
    root = _current_build(tmp_path)
    name = _first_source(root, "popularity")
    path = root / "build" / name / "popularity.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["format_version"] = popularity_mod.FORMAT_VERSION + 1
    path.write_text(json.dumps(meta), encoding="utf-8")
    _reseal(root / "build", name, "popularity.json")
    open_artifacts(root / "build")
    with pytest.raises(ArtifactError) as err, _source_config(root, name) as config:
        Retriever.from_yaml(config)
    assert _is_refusal(err.value, f"format_version {popularity_mod.FORMAT_VERSION + 1}")


# Calibration, rows and cache values are written by the current code here (a fixture of the
# current version may not exist yet right after a bump), then given the next version.


def test_future_calibration_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / CALIBRATION_FILE
    Calibration({"a": RankCurve((0, 1), (0.5, 0.25))}, users=3).save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format_version"] == CALIBRATION_VERSION
    data["format_version"] = CALIBRATION_VERSION + 1
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises((InputError, ArtifactError)) as err:  # the JSON readers' error now
        Calibration.load(path, ["a"])
    assert re.search(rf"calibration format(_version)? {CALIBRATION_VERSION + 1}\b", str(err.value))


@pytest.mark.parametrize(
    "ids",
    [[5, -1], ["a", "é"], np.empty(0, dtype=np.int64), np.empty(0, dtype=str)],
    ids=["int", "str", "int-empty", "str-empty"],
)
def test_future_row_version_is_refused(ids: Any) -> None:
    arr = np.asarray(ids)
    blob = bytearray(pack_row(arr, np.ones(arr.shape[0], dtype=np.float32)))
    assert bytes(blob[:5]) == b"CRNR" + bytes([ROW_FORMAT_VERSION])
    blob[4] = ROW_FORMAT_VERSION + 1  # the version byte after b"CRNR"
    with pytest.raises(RowFormatError, match=f"row format version {ROW_FORMAT_VERSION + 1}"):
        unpack_row(bytes(blob))


@pytest.mark.parametrize("ids", [[7, 8], ["x", "日本"], []], ids=["int", "str", "empty"])
def test_future_cache_version_is_refused(ids: list[Any]) -> None:
    n = len(ids)
    value = CandidateSet(
        item_ids=np.asarray(ids) if n else np.empty(0, dtype=np.int64),
        scores=np.linspace(1.0, 0.5, n, dtype=np.float32),
        source_names=("a",),
        ranks=np.arange(n, dtype=np.int32).reshape(n, 1),
        reports=(SourceReport("a", SourceStatus.OK, 1.0, n, n),),
    )
    version = cache_mod._VERSION
    blob = bytearray(encode_result(value))
    assert bytes(blob[:5]) == b"CRCS" + bytes([version])
    blob[4] = version + 1  # the format byte after b"CRCS"
    with pytest.raises(CacheFormatError, match=f"version {version + 1}"):
        decode_result(bytes(blob))


def test_fixture_files_are_stored_verbatim() -> None:
    """Checksummed build files (JSON sidecars included) must reach the test byte for byte:
    the fixture tree's .gitattributes turns off git's end-of-line conversion for them."""
    attrs = (FIXTURES / ".gitattributes").read_text(encoding="utf-8").splitlines()
    assert "* -text" in attrs
