"""Corrupt, foreign or mixed artifacts are refused before anything is mapped; builds publish in
one atomic step; ``--only`` keeps the other sources; a FIFO never blocks startup.

Every test makes real small builds with ``retrieval.offline.build.build`` in ``tmp_path``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval import Retriever
from retrieval.artifacts import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    STAMP_NAME,
    ArtifactWriter,
    Manifest,
    open_artifacts,
    prefetch_page_cache,
    resolve_build,
    save_csr,
    source_root,
)
from retrieval.artifacts import ArtifactError as ArtifactsArtifactError
from retrieval.config import RetrievalConfig, load_config
from retrieval.errors import ArtifactError
from retrieval.offline.build import build
from retrieval.types import SourceStatus
from sources.base import SourceContext
from tests.session_log import write_session_log

REPO = Path(__file__).resolve().parents[1]

NEIGHBOURS = """
  - name: covis
    kind: covisitation
    params: {window: 3, top_k: 20}
  - name: popular
    kind: popularity
"""
ANNOY = """
  - name: ann
    kind: ann
    params: {backend: annoy, factors: 8, iterations: 3, n_trees: 4, search_k: 100000}
"""


def make_config(tmp_path: Path, sources: str = NEIGHBOURS, name: str = "retrieval.yaml") -> Path:
    path = tmp_path / name
    path.write_text(
        "k: 20\ndeadline_ms: 5000\nartifacts: build\n"
        "blend: {strategy: rrf, exclude_seen: false}\nsources:" + textwrap.dedent(sources)
    )
    return path


def make_log(tmp_path: Path, seed: int = 0, name: str = "log.csv", sessions: int = 300) -> Path:
    log = tmp_path / name
    write_session_log(log, sessions=sessions, seed=seed, n_items=120)
    return log


def built(tmp_path: Path, sources: str = NEIGHBOURS) -> tuple[RetrievalConfig, Path, Path]:
    """A config, its log and its published build (``<tmp>/build``)."""
    cfg_path = make_config(tmp_path, sources)
    config = load_config(cfg_path)
    log = make_log(tmp_path)
    out = tmp_path / "build"
    build(config, log, out, progress=False)
    return config, log, out


def flip_last_byte(path: Path) -> None:
    """One bit of the file's last byte (past any header, so the file still parses)."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def history_of(out: Path) -> list[object]:
    items = np.load(out / "ids" / "items.npy")
    return [items[0].item(), items[1].item()]


# ---------------------------------------------------------------------------------- checksums


def test_artifact_error_is_the_error_tree_one() -> None:
    assert ArtifactsArtifactError is ArtifactError


def test_manifest_lists_every_file_with_size_sha256_and_build_stamp(tmp_path: Path) -> None:
    _, _, out = built(tmp_path)
    manifest = open_artifacts(out)
    assert manifest.format_version == FORMAT_VERSION
    root = resolve_build(out)
    assert root.name == manifest.build_id
    assert set(manifest.files) == {"ids/items.npy", "ids/users.npy"}
    listed = {root / rel: fs for rel, fs in manifest.files.items()}
    for name, entry in manifest.sources.items():
        assert entry.build_id == manifest.build_id
        assert (root / name / STAMP_NAME).read_text().strip() == manifest.build_id
        assert entry.id_maps == {rel: fs.sha256 for rel, fs in manifest.files.items()}
        listed.update({root / name / rel: fs for rel, fs in entry.files.items()})
    on_disk = {
        p for p in root.rglob("*") if p.is_file() and p.name not in (MANIFEST_NAME, STAMP_NAME)
    }
    assert set(listed) == on_disk  # every file the build wrote, nothing else
    for path, fs in listed.items():
        data = path.read_bytes()
        assert fs.size == len(data) and fs.sha256 == hashlib.sha256(data).hexdigest()


def test_a_flipped_bit_is_refused_naming_file_expected_and_found(tmp_path: Path) -> None:
    config, _, out = built(tmp_path)
    scores = out / "covis" / "scores.npy"
    expected = open_artifacts(out).sources["covis"].files["scores.npy"].sha256
    flip_last_byte(scores)
    found = hashlib.sha256(scores.read_bytes()).hexdigest()
    with pytest.raises(ArtifactError) as exc:
        open_artifacts(out)
    message = str(exc.value)
    assert str(resolve_build(out) / "covis" / "scores.npy") in message
    assert expected in message and found in message
    # The source alone (no Retriever) checks too, and so does the Retriever.
    from sources.covisitation import CovisitationSource

    sc = config.source("covis")
    with pytest.raises(ArtifactError, match=r"scores\.npy"):
        CovisitationSource("covis", sc.resolved_params, SourceContext(artifacts=out))
    with pytest.raises(ArtifactError, match=r"scores\.npy"):
        Retriever(config)


def test_truncated_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    _, _, out = built(tmp_path)
    indptr = out / "popular" / "indptr.npy"
    size = indptr.stat().st_size
    with indptr.open("r+b") as f:
        f.truncate(size - 8)
    with pytest.raises(ArtifactError, match=rf"{size - 8} bytes, the manifest expects {size}"):
        open_artifacts(out)


def test_all_nan_scores_after_the_build_are_refused_at_load(tmp_path: Path) -> None:
    config, _, out = built(tmp_path)
    path = out / "covis" / "scores.npy"
    scores = np.load(path)
    np.save(path, np.full_like(scores, np.nan))  # same shape, same size: only the bytes differ
    with pytest.raises(ArtifactError, match=r"covis/scores\.npy: sha256"):
        Retriever(config)


def test_reversed_item_map_is_refused(tmp_path: Path) -> None:
    config, _, out = built(tmp_path)
    path = out / "ids" / "items.npy"
    np.save(path, np.load(path)[::-1].copy())
    with pytest.raises(ArtifactError, match=r"ids/items\.npy: sha256"):
        Retriever(config)


def test_a_source_directory_from_another_build_is_refused(tmp_path: Path) -> None:
    config, log, out = built(tmp_path)
    other = tmp_path / "other"
    build(config, make_log(tmp_path, seed=1, name="other.csv"), other, progress=False)
    mine = resolve_build(out) / "covis"
    # The whole directory, stamp included: the stamp names the other build.
    shutil.rmtree(mine)
    shutil.copytree(other / "covis", mine)
    with pytest.raises(ArtifactError, match="from another build"):
        open_artifacts(out)
    with pytest.raises(ArtifactError, match="from another build"):
        Retriever(config)
    # Its files under this build's stamp: the checksums differ.
    build(config, log, out, progress=False)
    mine = resolve_build(out) / "covis"
    for f in ("indptr.npy", "indices.npy", "scores.npy"):
        shutil.copy(other / "covis" / f, mine / f)
    with pytest.raises(ArtifactError, match=r"covis/\w+\.npy: .*the manifest expects"):
        open_artifacts(out)


def test_missing_stamp_is_refused(tmp_path: Path) -> None:
    _, _, out = built(tmp_path)
    (out / "popular" / STAMP_NAME).unlink()
    with pytest.raises(ArtifactError, match=f"no readable {STAMP_NAME} stamp"):
        open_artifacts(out)


def test_builders_refuse_non_finite_scores(tmp_path: Path, monkeypatch) -> None:
    from retrieval.artifacts import CSR

    nan = CSR(
        np.array([0, 2], dtype=np.int64),
        np.array([0, 1], dtype=np.int32),
        np.array([np.nan, np.nan], dtype=np.float32),
    )
    with pytest.raises(ArtifactError, match="2 of 2 values are NaN or inf"):
        save_csr(tmp_path / "nb", nan)

    config, log, out = built(tmp_path)
    before = open_artifacts(out).build_id
    import sources.covisitation as covisitation

    real = covisitation.build_covisitation

    def poisoned(*args, **kwargs):
        csr, stats = real(*args, **kwargs)
        return CSR(csr.indptr, csr.indices, np.full_like(csr.scores, np.nan)), stats

    monkeypatch.setattr(covisitation, "build_covisitation", poisoned)
    with pytest.raises(ArtifactError, match="NaN or inf"):
        build(config, log, out, progress=False)
    assert open_artifacts(out).build_id == before  # the published build is untouched


def test_ann_builder_refuses_non_finite_als_factors(tmp_path: Path, monkeypatch) -> None:
    import sources.ann as ann

    real = ann._fit_als

    def poisoned(*args, **kwargs):
        items, users = real(*args, **kwargs)
        items[3, 1] = np.inf
        return items, users

    monkeypatch.setattr(ann, "_fit_als", poisoned)
    config = load_config(make_config(tmp_path, ANNOY))
    with pytest.raises(ArtifactError, match=r"item factors: 1 of \d+ values are NaN or inf"):
        build(config, make_log(tmp_path), tmp_path / "build", progress=False)


# ---------------------------------------------------------------------------------- annoy


_SERVE = """
import sys
from retrieval import Retriever
from retrieval.errors import ArtifactError
try:
    retriever = Retriever.from_yaml(sys.argv[1])
except ArtifactError as exc:
    print("ArtifactError:", exc, flush=True)
    sys.exit(3)
res = retriever.blend(user_id="nobody", history=[int(x) for x in sys.argv[2:]])
print("served", res.report("ann").status, res.item_ids[:5].tolist(), flush=True)
"""


def _bucket_offsets(path: Path, n_items: int, dims: int) -> list[int]:
    """Byte offsets of the n_descendants of every leaf bucket of an annoy euclidean index
    (nodes: int32 n_descendants, float offset, int32 children[2], float v[dims])."""
    node = 4 + 4 + 8 + 4 * dims
    k = (node - 8) // 4  # ids a bucket node holds in place of its children and vector
    counts = np.frombuffer(path.read_bytes(), dtype="<i4").reshape(-1, node // 4)[:, 0]
    return [i * node for i in range(n_items, counts.shape[0]) if 2 <= counts[i] <= k]


def test_a_corrupted_annoy_index_is_refused_and_the_process_survives(tmp_path: Path) -> None:
    config, _, out = built(tmp_path, ANNOY)
    cfg = tmp_path / "retrieval.yaml"
    history = [str(x) for x in history_of(out)]
    ok = subprocess.run(
        [sys.executable, "-c", _SERVE, str(cfg), *history],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0 and "served ok" in ok.stdout, ok.stdout + ok.stderr

    index = out / "ann" / "index.ann"
    meta = json.loads((out / "ann" / "ann.json").read_text())
    offsets = _bucket_offsets(index, meta["n_items"], meta["dims"])
    assert offsets
    data = bytearray(index.read_bytes())
    for at in offsets:  # one byte each: the count's top byte, which makes it negative
        data[at + 3] = 0xFF
    index.write_bytes(bytes(data))
    # Before the checksums, annoy loaded this and aborted the process (std::length_error,
    # exit 134) on the first query reaching a bucket.
    bad = subprocess.run(
        [sys.executable, "-c", _SERVE, str(cfg), *history],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 3, (bad.returncode, bad.stdout, bad.stderr[-2000:])
    assert "index.ann: sha256" in bad.stdout and "the manifest expects" in bad.stdout

    from sources.ann import AnnSource

    with pytest.raises(ArtifactError, match=r"index\.ann: sha256"):
        AnnSource("ann", config.source("ann").resolved_params, SourceContext(artifacts=out))


def test_a_single_flipped_byte_in_an_annoy_index_is_refused(tmp_path: Path) -> None:
    config, _, out = built(tmp_path, ANNOY)
    index = out / "ann" / "index.ann"
    data = bytearray(index.read_bytes())
    data[len(data) // 3] ^= 0x40  # a vector component or child id: a different ranking, or worse
    index.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"index\.ann: sha256"):
        Retriever(config)


# ---------------------------------------------------------------------------------- --only


def test_only_keeps_the_other_sources_of_the_existing_build(tmp_path: Path) -> None:
    config, log, out = built(tmp_path)
    first = open_artifacts(out)
    first_root = resolve_build(out)
    rows = build(config, log, out, only=["covis"], progress=False)
    assert [r.name for r in rows] == ["covis"]
    second = open_artifacts(out)  # verifies every file, the kept ones included
    root = resolve_build(out)
    assert root != first_root and second.build_id != first.build_id
    assert set(second.sources) == {"covis", "popular"}
    assert second.sources["covis"].build_id == second.build_id
    kept = second.sources["popular"]
    assert kept == first.sources["popular"]  # entry, checksums and build id as they were
    for rel in kept.files:  # hard-linked, not copied
        now, then = root / "popular" / rel, first_root / "popular" / rel
        assert now.stat().st_ino == then.stat().st_ino
    with Retriever(config) as retriever:
        res = retriever.blend(user_id="nobody", history=history_of(out))
        assert res.report("covis").status is SourceStatus.OK
        assert res.report("popular").status is SourceStatus.OK


def test_only_through_the_cli_with_a_relative_artifacts_path(tmp_path: Path) -> None:
    from retrieval.tools.cli import main

    cfg = make_config(tmp_path)
    log = make_log(tmp_path)
    assert main(["build", str(cfg), "--events", str(log)]) == 0
    # The config's relative `artifacts: build` resolves through the link to the build itself;
    # the build must still be published through the link, not nested inside the build.
    assert main(["build", str(cfg), "--events", str(log), "--only", "popular"]) == 0
    out = tmp_path / "build"
    assert out.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".build.builds"]
    assert set(open_artifacts(out).sources) == {"covis", "popular"}


def test_only_refuses_other_id_maps_and_leaves_the_build_alone(tmp_path: Path) -> None:
    config, _, out = built(tmp_path)
    before = open_artifacts(out).build_id
    other = make_log(tmp_path, seed=5, name="other.csv", sessions=200)
    with pytest.raises(ArtifactError, match=r"another ids/items\.npy.*Build every source"):
        build(config, other, out, only=["covis"], progress=False)
    assert open_artifacts(out).build_id == before
    assert len([p for p in (tmp_path / ".build.builds").iterdir() if p.name[0] != "."]) == 1


def test_only_refuses_a_damaged_build_to_keep_from(tmp_path: Path) -> None:
    config, log, out = built(tmp_path)
    flip_last_byte(out / "popular" / "scores.npy")
    with pytest.raises(ArtifactError, match=r"cannot keep.*popular/scores\.npy"):
        build(config, log, out, only=["covis"], progress=False)


# ---------------------------------------------------------------------------------- publishing


def builds_of(out: Path) -> list[str]:
    return sorted(
        p.name for p in (out.parent / f".{out.name}.builds").iterdir() if p.name[0] != "."
    )


def test_publishing_is_one_link_swap_and_keeps_one_previous_build(tmp_path: Path) -> None:
    config, log, out = built(tmp_path)
    assert out.is_symlink() and not os.path.isabs(os.readlink(out))  # relocatable
    first = resolve_build(out)
    build(config, log, out, progress=False)
    second = resolve_build(out)
    assert builds_of(out) == sorted([first.name, second.name])
    # A reader that resolved the link before the swap still has a complete, valid build.
    assert open_artifacts(first).build_id == first.name
    build(config, log, out, progress=False)
    assert builds_of(out) == sorted([second.name, resolve_build(out).name])
    assert not first.exists()


def test_a_failed_swap_leaves_the_previous_build_published(tmp_path: Path, monkeypatch) -> None:
    config, log, out = built(tmp_path)
    before = resolve_build(out)
    import retrieval.artifacts as artifacts

    def crash(*args, **kwargs):
        raise OSError("simulated crash at the swap")

    monkeypatch.setattr(artifacts.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        build(config, log, out, progress=False)
    monkeypatch.undo()
    assert resolve_build(out) == before
    open_artifacts(out)
    assert builds_of(out) == [before.name]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".build.builds"]


_SLOW_BUILD = """
import sys, time
from pathlib import Path
import sources.popularity as popularity
from retrieval.offline.build import build
from retrieval.config import load_config

def stuck(*args, **kwargs):
    Path(sys.argv[3]).touch()
    time.sleep(600)

popularity.PopularitySource.build = classmethod(stuck)
build(load_config(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[1]).parent / "build")
"""


def test_a_killed_build_leaves_the_previous_published_and_is_cleaned_next_time(
    tmp_path: Path,
) -> None:
    config, log, out = built(tmp_path)
    before = resolve_build(out)
    flag = tmp_path / "building"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_BUILD, str(tmp_path / "retrieval.yaml"), str(log), str(flag)],
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the build did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert resolve_build(out) == before  # still published, still whole
    open_artifacts(out)
    assert len(builds_of(out)) == 2  # the killed build's unfinished directory
    build(config, log, out, progress=False)
    assert builds_of(out) == sorted([before.name, resolve_build(out).name])


def test_leftovers_of_the_two_rename_writer_are_cleaned(tmp_path: Path) -> None:
    config, log, out = built(tmp_path)
    stale = tmp_path / ".build.tmp-abc123"
    (stale / "covis").mkdir(parents=True)
    (stale / "covis" / "scores.npy").write_bytes(b"x" * 100)
    build(config, log, out, progress=False)
    assert not stale.exists()


def test_two_builds_into_one_directory_do_not_interleave(tmp_path: Path) -> None:
    out = tmp_path / "build"
    with ArtifactWriter(out, Manifest(package_version="0")) as writer:
        (writer.tmp / "x.txt").write_text("x")
        with pytest.raises(ArtifactError, match="another build is writing it"):
            ArtifactWriter(out, Manifest(package_version="0")).__enter__()
    assert (out / "x.txt").read_text() == "x"


def test_an_old_layout_build_is_refused_with_rebuild_and_replaced_by_a_build(
    tmp_path: Path,
) -> None:
    config, log, _ = built(tmp_path)
    old = tmp_path / "old"
    old.mkdir()
    (old / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "package_version": "0"}))
    with pytest.raises(ArtifactError, match=r"format_version 1.*rebuild with `retrieval build`"):
        open_artifacts(old)
    build(config, log, old, progress=False)
    assert old.is_symlink()
    kept = builds_of(old)
    assert len(kept) == 2 and any(name.startswith("legacy-") for name in kept)
    open_artifacts(old)


def test_a_build_inside_the_builds_directory_is_not_an_output(tmp_path: Path) -> None:
    config, log, out = built(tmp_path)
    first = resolve_build(out)
    build(config, log, out, progress=False)
    with pytest.raises(ArtifactError, match="older build kept inside"):
        build(config, log, first, progress=False)


# ---------------------------------------------------------------------------------- FIFOs


def _runs_within(fn, seconds: float, unblock: list[Path]) -> bool:
    """Whether ``fn`` returns within ``seconds``; FIFOs in ``unblock`` are then opened for
    writing so a reader stuck in them (the old behaviour) is released."""
    done = threading.Event()
    result: list[object] = []

    def run() -> None:
        try:
            result.append(fn())
        except Exception as exc:  # reported by the caller's assertions
            result.append(exc)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    finished = done.wait(seconds)
    if not finished:
        for fifo in unblock:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        done.wait(10)
    return finished


def test_a_fifo_in_the_artifacts_never_blocks_prefetch(tmp_path: Path) -> None:
    config, _, out = built(tmp_path)
    root = resolve_build(out)
    unlisted = root / "covis" / "pipe"
    os.mkfifo(unlisted)
    assert _runs_within(lambda: prefetch_page_cache(out), 10, [unlisted])
    # Without a (usable) manifest prefetch walks every file: FIFOs are still never opened.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "data.bin").write_bytes(b"x" * 1000)
    os.mkfifo(bare / "pipe")
    assert _runs_within(lambda: prefetch_page_cache(bare), 10, [bare / "pipe"])
    assert prefetch_page_cache(bare) == 1000
    # A FIFO in place of a listed file is refused at load, at once.
    listed = root / "covis" / "scores.npy"
    listed.unlink()
    os.mkfifo(listed)
    failures: list[BaseException] = []

    def load() -> None:
        try:
            Retriever(config)
        except ArtifactError as exc:
            failures.append(exc)

    assert _runs_within(load, 30, [listed])
    assert failures and "a FIFO, not a regular file" in str(failures[0])


def test_prefetch_after_verification_reads_only_what_was_not_just_read(tmp_path: Path) -> None:
    _, _, out = built(tmp_path)
    an_hour_ago = time.time() - 3600
    for path in resolve_build(out).rglob("*"):  # files just written are always re-read
        os.utime(path, (an_hour_ago, an_hour_ago))
    open_artifacts(out)  # checksums every listed file: the page cache is warm already
    assert prefetch_page_cache(out) == (resolve_build(out) / MANIFEST_NAME).stat().st_size


def test_source_root_without_a_manifest_is_unchecked_and_with_one_checked(tmp_path: Path) -> None:
    _, _, out = built(tmp_path)
    assert source_root(out, "covis") == resolve_build(out)
    with pytest.raises(ArtifactError, match="no artifacts in this build"):
        source_root(out, "nope")
    bare = tmp_path / "bare"
    (bare / "covis").mkdir(parents=True)
    assert source_root(bare, "covis") == bare.resolve()
