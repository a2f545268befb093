"""Artifacts: CSR and id-map round trips, the manifest, and the atomic build directory."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import numpy as np
import pytest

from retrieval.artifacts import (
    CSR,
    FORMAT_VERSION,
    ArtifactError,
    ArtifactWriter,
    IdMap,
    Manifest,
    check_source,
    fingerprint,
    load_csr,
    open_artifacts,
    params_hash,
    read_versioned_json,
    save_csr,
)


def small_csr() -> CSR:
    return CSR(
        indptr=np.array([0, 2, 2, 5], dtype=np.int64),
        indices=np.array([3, 1, 0, 2, 1], dtype=np.int32),
        scores=np.array([0.9, 0.1, 3.0, 2.0, 1.0], dtype=np.float32),
    )


# ---------------------------------------------------------------------------------- CSR


def mapped(arr: np.ndarray) -> bool:
    """Whether ``arr`` reads from a file mapping (somewhere down its chain of bases)."""
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return isinstance(base, mmap.mmap)


def test_csr_round_trip_mmap(tmp_path: Path) -> None:
    save_csr(tmp_path / "nb", small_csr())
    csr = load_csr(tmp_path / "nb")
    assert mapped(csr.indices) and type(csr.indices) is np.ndarray  # no memmap subclass overhead
    assert csr.n_rows == 3 and csr.nnz == 5
    idx, sc = csr.row(2)
    assert idx.tolist() == [0, 2, 1] and sc.tolist() == [3.0, 2.0, 1.0]
    assert csr.row(1)[0].size == 0
    with pytest.raises(IndexError):
        csr.row(3)
    assert not mapped(load_csr(tmp_path / "nb", mmap=False).indices)


def test_csr_save_rejects_wrong_dtype(tmp_path: Path) -> None:
    bad = CSR(small_csr().indptr, small_csr().indices.astype(np.int64), small_csr().scores)
    with pytest.raises(ArtifactError, match="indices must be int32"):
        save_csr(tmp_path / "nb", bad)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("indptr", np.array([0, 2, 2, 4], dtype=np.int64), "indptr must run from 0 to nnz=5"),
        ("scores", np.ones(4, dtype=np.float32), "indices has 5 entries but scores has 4"),
        ("indices", np.ones(5, dtype=np.int64), "indices must be int32"),
    ],
)
def test_load_csr_names_path_and_problem(
    tmp_path: Path, name: str, value: np.ndarray, message: str
) -> None:
    save_csr(tmp_path / "nb", small_csr())
    np.save(tmp_path / "nb" / f"{name}.npy", value)
    with pytest.raises(ArtifactError, match=message) as exc:
        load_csr(tmp_path / "nb")
    assert str(tmp_path / "nb") in str(exc.value)


def test_load_csr_missing_file_and_pickles_refused(tmp_path: Path) -> None:
    save_csr(tmp_path / "nb", small_csr())
    (tmp_path / "nb" / "scores.npy").unlink()
    with pytest.raises(ArtifactError, match=r"scores\.npy: missing"):
        load_csr(tmp_path / "nb")
    np.save(tmp_path / "nb" / "scores.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ArtifactError, match="not a readable"):
        load_csr(tmp_path / "nb")


# ---------------------------------------------------------------------------------- IdMap


def test_idmap_int_round_trip_and_unknown() -> None:
    ids = np.array([50, 7, 50, 1_000_000_000_000, 7], dtype=np.int64)
    m, codes = IdMap.from_values(ids)
    assert len(m) == 3 and codes.dtype == np.int32
    assert m.values.tolist() == [7, 50, 1_000_000_000_000]
    assert np.array_equal(m.to_external(codes), ids)
    assert m.to_dense([7, 8, 50]).tolist() == [0, -1, 1]
    assert m.to_dense(np.array([], dtype=np.int64)).shape == (0,)
    # the one id rule: canonical int text is parsed; " 7", "+7", "07" are strings and floats
    # and bools are no ids, so all of those are unknown; missing value configurable
    assert m.to_dense(["50", " 7", "x", "7.5", "", "+7", "07"]).tolist() == [1] + [-1] * 6
    assert m.to_dense([50.0, 7.5, True], missing=-9).tolist() == [-9, -9, -9]
    assert m.to_dense(np.int64(50)).tolist() == [1]


def test_idmap_str_round_trip_and_unknown() -> None:
    ids = np.array(["b", "a", "ccc", "a", "é"])
    m, codes = IdMap.from_values(ids)
    assert m.values.tolist() == ["a", "b", "ccc", "é"]
    assert np.array_equal(m.to_external(codes), ids)
    assert codes.tolist() == [1, 0, 2, 0, 3]
    # a query longer than any stored id must not be truncated into a false match
    assert m.to_dense(["a", "cccc", "zz", "é"]).tolist() == [0, -1, -1, 3]
    m2, _ = IdMap.from_values(np.array(["10", "20", "x"]))
    assert m2.to_dense([20, 30]).tolist() == [1, -1]  # ints against a str map are str()-ed
    assert m2.to_dense(np.array([b"10"])).tolist() == [0]


def test_idmap_matches_numpy_order_for_unicode() -> None:
    ids = np.array(["Z", "a", "Ä", "ä", "中", "😀", "A"])
    m, codes = IdMap.from_values(ids)
    assert m.values.tolist() == sorted(set(ids.tolist()))
    assert np.array_equal(m.values[codes], ids)
    assert np.array_equal(m.to_dense(ids), codes)


def test_idmap_save_load_mmap(tmp_path: Path) -> None:
    for values in (np.array([3, 1, 2], dtype=np.int64), np.array(["x", "yy", "a"])):
        m, codes = IdMap.from_values(values)
        m.save(tmp_path / "ids.npy")
        loaded = IdMap.load(tmp_path / "ids.npy")
        assert mapped(loaded.values)
        assert np.array_equal(loaded.to_dense(values), codes)
        assert np.array_equal(loaded.to_external(codes), values)
    np.save(tmp_path / "bad.npy", np.array([1.5, 2.5]))
    with pytest.raises(ArtifactError, match=r"bad\.npy.*int64 or unicode"):
        IdMap.load(tmp_path / "bad.npy")


def test_idmap_to_external_range() -> None:
    m, _ = IdMap.from_values(np.array([1, 2]))
    with pytest.raises(IndexError):
        m.to_external([2])
    with pytest.raises(IndexError):
        m.to_external([-1])


# ---------------------------------------------------------------------------------- manifest


def test_params_hash_is_stable_and_order_free() -> None:
    a = params_hash("covisitation", {"window": 5, "k": 100, "nested": {"x": 1, "y": [1, 2]}})
    b = params_hash("covisitation", {"nested": {"y": [1, 2], "x": 1}, "k": 100, "window": 5})
    assert a == b and len(a) == 16
    assert a != params_hash("itemcf", {"window": 5, "k": 100, "nested": {"x": 1, "y": [1, 2]}})
    assert a != params_hash(
        "covisitation", {"window": 6, "k": 100, "nested": {"x": 1, "y": [1, 2]}}
    )


def test_fingerprint_sees_changes(tmp_path: Path) -> None:
    f = tmp_path / "events.csv"
    f.write_bytes(b"a" * (3 << 20))
    fp = fingerprint(f)
    assert fp["size_bytes"] == 3 << 20 and fp["path"] == str(f.resolve())
    f.write_bytes(b"a" * ((3 << 20) - 1) + b"b")  # same size, last byte differs
    assert fingerprint(f)["sha256_head_tail"] != fp["sha256_head_tail"]


def build(out: Path, marker: str, fail: bool = False) -> None:
    with ArtifactWriter(out) as w:
        (w.tmp / "marker.txt").write_text(marker)
        save_csr(w.tmp / "covisitation", small_csr())
        if fail:
            raise RuntimeError("boom")
        m = Manifest(package_version="0.1.0", counts={"events": 5, "users": 2, "items": 4})
        m.add_source("covis", "covisitation", {"window": 5, "path": Path("/x")}, {"nnz": 5})
        w.manifest = m


def builds_kept(out: Path) -> list[str]:
    """The builds beside ``out`` (``out`` links to one of them), after checking that nothing
    else was left next to it."""
    assert sorted(p.name for p in out.parent.iterdir()) == [f".{out.name}.builds", out.name]
    return sorted(
        p.name for p in (out.parent / f".{out.name}.builds").iterdir() if p.name[0] != "."
    )


def test_writer_builds_replaces_and_survives_crash(tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    build(out, "first")
    manifest = open_artifacts(out)
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.sources["covis"].params == {"window": 5, "path": "/x"}
    assert load_csr(out / "covisitation").nnz == 5
    first = builds_kept(out)
    assert out.is_symlink() and first == [manifest.build_id]

    with pytest.raises(RuntimeError, match="boom"):
        build(out, "second", fail=True)
    assert (out / "marker.txt").read_text() == "first"
    assert builds_kept(out) == first  # no unfinished build left behind

    build(out, "third")
    assert (out / "marker.txt").read_text() == "third"
    third = open_artifacts(out).build_id
    assert builds_kept(out) == sorted([*first, third])  # the previous build is kept, once
    build(out, "fourth")
    assert builds_kept(out) == sorted([third, open_artifacts(out).build_id])


def test_writer_without_manifest_keeps_previous(tmp_path: Path) -> None:
    out = tmp_path / "artifacts"
    build(out, "first")
    first = builds_kept(out)
    with pytest.raises(ArtifactError, match="without a manifest"), ArtifactWriter(out) as w:
        (w.tmp / "marker.txt").write_text("second")
    assert (out / "marker.txt").read_text() == "first"
    assert builds_kept(out) == first


def test_writer_refuses_to_replace_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        build(tmp_path / "home", "x")
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


def test_open_artifacts_refuses_incomplete_and_other_versions(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        open_artifacts(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(ArtifactError, match=r"no manifest\.json: not a complete build") as exc:
        open_artifacts(tmp_path / "half")
    assert str(tmp_path / "half") in str(exc.value)

    out = tmp_path / "artifacts"
    build(out, "x")
    raw = json.loads((out / "manifest.json").read_text())
    raw["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(
        ArtifactError, match=rf"format_version 99.*reads format_version {FORMAT_VERSION}.*rebuild"
    ):
        open_artifacts(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        open_artifacts(out)


def test_check_source(tmp_path: Path) -> None:
    build(tmp_path / "a", "x")
    m = open_artifacts(tmp_path / "a")
    good = params_hash("covisitation", {"window": 5, "path": "/x"})
    check_source(m, "covis", "covisitation", good)
    with pytest.raises(ArtifactError, match=r"other params.*retrieval build"):
        check_source(m, "covis", "covisitation", params_hash("covisitation", {"window": 6}))
    with pytest.raises(ArtifactError, match=r"kind 'covisitation'.*'itemcf'"):
        check_source(m, "covis", "itemcf", good)
    with pytest.raises(ArtifactError, match="no artifacts in this build"):
        check_source(m, "ann", "ann", good)


def test_prefetch_reads_every_file_through_links_and_skips_broken_ones(tmp_path: Path) -> None:
    from retrieval.artifacts import prefetch_page_cache

    part = tmp_path / "part"
    part.mkdir()
    (part / "scores.npy").write_bytes(b"x" * 100_000)
    serving = tmp_path / "serving"
    serving.mkdir()
    (serving / "manifest.json").write_text("{}")
    (serving / "covisit").symlink_to(part)  # how large_catalog.py merges per-source builds
    (serving / "gone").symlink_to(tmp_path / "nowhere")
    assert prefetch_page_cache(serving, chunk_bytes=4096) == 100_002


def test_a_bumped_build_version_refuses_builds_of_the_older_builder() -> None:
    from typing import ClassVar

    from retrieval.artifacts import build_params_hash_input
    from sources.itemcf import ItemCFParams

    class Older(ItemCFParams):
        build_version: ClassVar[int] = 1

    new, old = ItemCFParams(), Older()
    assert build_params_hash_input(new)["build_version"] == 2
    assert "build_version" not in build_params_hash_input(old)  # hashes from before versions
    assert params_hash("itemcf", build_params_hash_input(new)) != params_hash(
        "itemcf", build_params_hash_input(old)
    )


def test_the_one_versioned_json_reader_names_file_versions_and_remedy(tmp_path: Path) -> None:
    path = tmp_path / "thing.json"
    path.write_text(json.dumps({"format_version": 3, "x": 1}))
    assert read_versioned_json(path, 3, "thing") == {"format_version": 3, "x": 1}
    cases = {
        json.dumps({"format_version": 4}): r"thing format_version 4, but this code reads "
        r"format_version 3; rebuild with `retrieval build`",
        json.dumps({"x": 1}): r"thing format_version None, but this code reads format_version 3",
        json.dumps({"format_version": True}): r"format_version True",
        "[1, 2]": r"expected a JSON object \(thing\), found list",
        "{not json": r"thing is not valid JSON",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ArtifactError, match=rf"thing\.json: .*{message}"):
            read_versioned_json(path, 3, "thing")
    with pytest.raises(ArtifactError, match=r"nope\.json: missing thing; rerun it"):
        read_versioned_json(tmp_path / "nope.json", 3, "thing", remedy="rerun it")
