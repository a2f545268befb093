"""On-disk artifacts: CSR neighbour lists, id maps, the manifest and the atomic build directory.

Everything is plain ``.npy`` (opened with ``mmap_mode="r"`` so 10M-item artifacts load in
milliseconds and worker processes share the page cache) or JSON; pickles are never read or
written (``allow_pickle=False`` everywhere), so an artifact directory is safe to load from
anywhere and readable from any language.

The manifest records the size and SHA-256 of every file a build wrote, and each source
directory carries the id of the build that wrote it (``BUILD_ID``); :func:`open_artifacts` and
:func:`source_root` check them before anything is memory-mapped or handed to annoy or faiss, so
a damaged, swapped or foreign file is an ArtifactError, not a crash or a silently different
ranking. ``<out>`` is a link to ``.<out>.builds/<build-id>/``, replaced atomically by each
build (:class:`ArtifactWriter`); readers resolve it once (:func:`resolve_build`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retrieval import kernels
from retrieval.errors import ArtifactError
from retrieval.ids import id_array, id_keys

if TYPE_CHECKING:
    from retrieval.config import SourceConfig
    from sources.base import SourceParams

__all__ = [
    "CSR",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "REBUILD",
    "STAMP_NAME",
    "ArtifactError",
    "ArtifactWriter",
    "FileSum",
    "IdMap",
    "Manifest",
    "SourceEntry",
    "build_params_hash_input",
    "check_built",
    "check_source",
    "file_sum",
    "fingerprint",
    "load_csr",
    "map_in_full",
    "new_build_id",
    "open_artifacts",
    "params_hash",
    "prefetch_page_cache",
    "read_json_object",
    "read_versioned_json",
    "require_finite",
    "resolve_build",
    "save_csr",
    "seal_build",
    "serving_view",
    "source_root",
    "verify_build",
    "verify_file",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

# 2: per-file SHA-256 and build ids in the manifest, BUILD_ID stamps in source directories
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
STAMP_NAME = "BUILD_ID"  # in each source directory: the id of the build that wrote it
_FINGERPRINT_BYTES = 1 << 20
# Reads of 256 KiB stay in L2 while SHA-256 runs: much faster than 16 MiB reads.
_HASH_CHUNK = 256 << 10
_VERIFY_THREADS = 4  # files checked at once (also capped by the CPUs this process may use)
_PARALLEL_BYTES = 32 << 20  # below this, checking in one thread is as fast
_FRESH_S = 600.0  # a checksum this process computed is trusted again for this long
# A file modified this recently when it is hashed could change again within the same coarse
# timestamp tick, unseen by (inode, size, mtime): its checksum is not remembered (git's "racy
# clean" rule).
_RACY_NS = 2_000_000_000
_MAX_STAMP = 256
_FINITE_CHUNK = 1 << 22  # elements checked for NaN/inf at a time (a 16 MB scratch at most)
_LOCK_NAME = ".lock"
_BUILDS_DIR = re.compile(r"\.(?P<name>.+)\.builds")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# (st_dev, st_ino, size, mtime_ns) -> (sha256, when): files this process has checksummed.
_verified: dict[tuple[int, int, int, int], tuple[str, float]] = {}
_verified_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# versioned JSON: the manifest, sidecars, calibration curves

REBUILD = "rebuild with `retrieval build`"


def read_json_object(path: Path, what: str, *, remedy: str = REBUILD) -> dict[str, Any]:
    """The JSON object in ``path``; an ArtifactError naming the file, ``what`` it should hold and
    ``remedy`` (what to run) when it is missing, unreadable, not JSON or not an object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing {what}; {remedy}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable {what} ({exc}); {remedy}") from exc
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: {what} is not valid JSON ({exc}); {remedy}") from exc
    if not isinstance(raw, dict):
        raise ArtifactError(
            f"{path}: expected a JSON object ({what}), found {type(raw).__name__}; {remedy}"
        )
    return raw


def read_versioned_json(
    path: Path, expected_version: int, what: str, *, remedy: str = REBUILD
) -> dict[str, Any]:
    """The JSON object in ``path`` when its ``format_version`` is ``expected_version``: the one
    reader of every versioned JSON file. Anything else is an ArtifactError naming the file,
    ``what`` it holds, the version found and the one expected, and ``remedy``."""
    raw = read_json_object(path, what, remedy=remedy)
    found = raw.get("format_version")
    if found != expected_version or isinstance(found, bool):
        raise ArtifactError(
            f"{path}: {what} format_version {found!r}, but this code reads format_version "
            f"{expected_version}; {remedy}"
        )
    return raw


# --------------------------------------------------------------------------------------------
# CSR neighbour lists


@dataclass(frozen=True)
class CSR:
    """Per-row neighbour lists: row ``i`` is ``indices[indptr[i]:indptr[i+1]]``.

    Rows are sorted by descending score, so the top-k of a row is a slice, not a sort.
    """

    indptr: npt.NDArray[np.int64]
    indices: npt.NDArray[np.int32]
    scores: npt.NDArray[np.float32]

    @property
    def n_rows(self) -> int:
        """Rows the lists cover (``len(indptr) - 1``): valid rows for :meth:`row` are below it."""
        return int(self.indptr.shape[0]) - 1

    @property
    def nnz(self) -> int:
        """Neighbour entries stored over all rows: what the arrays' size (and memory) scale with."""
        return int(self.indices.shape[0])

    def row(self, i: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
        """The neighbours of row ``i`` and their scores (views, no copy)."""
        if not 0 <= i < self.n_rows:
            raise IndexError(f"row {i} out of range for a CSR with {self.n_rows} rows")
        start, end = int(self.indptr[i]), int(self.indptr[i + 1])
        return self.indices[start:end], self.scores[start:end]

    def validate(self, where: str = "CSR") -> None:
        """Cheap structural checks (O(1) reads) so a damaged file fails loudly, not later."""
        for name, arr, dtype in (
            ("indptr", self.indptr, np.int64),
            ("indices", self.indices, np.int32),
            ("scores", self.scores, np.float32),
        ):
            if arr.ndim != 1:
                raise ArtifactError(f"{where}: {name} must be 1-D, found shape {arr.shape}")
            if arr.dtype != dtype:
                raise ArtifactError(
                    f"{where}: {name} must be {np.dtype(dtype).name}, found {arr.dtype}"
                )
        if self.indptr.shape[0] < 1:
            raise ArtifactError(f"{where}: indptr is empty (it needs n_rows + 1 entries)")
        if self.indices.shape != self.scores.shape:
            raise ArtifactError(
                f"{where}: indices has {self.indices.shape[0]} entries but scores has "
                f"{self.scores.shape[0]}"
            )
        first, last = int(self.indptr[0]), int(self.indptr[-1])
        if first != 0 or last != self.nnz:
            raise ArtifactError(
                f"{where}: indptr must run from 0 to nnz={self.nnz}, found {first}..{last}"
            )


def require_finite(arr: npt.NDArray[Any], where: str) -> None:
    """Raise ArtifactError when a float array holds NaN or inf (checked in bounded chunks):
    builders refuse to write scores or vectors that would poison every ranking silently."""
    if arr.dtype.kind not in "fc":
        return
    flat = arr.reshape(-1)
    for start in range(0, flat.shape[0], _FINITE_CHUNK):
        bad = ~np.isfinite(flat[start : start + _FINITE_CHUNK])
        if bad.any():
            first = start + int(np.argmax(bad))
            count = int(np.count_nonzero(~np.isfinite(flat)))
            raise ArtifactError(
                f"{where}: {count} of {flat.shape[0]} values are NaN or inf (first at flat "
                f"index {first}); refusing to write them"
            )


def save_csr(directory: Path, csr: CSR) -> None:
    """Write ``indptr.npy``, ``indices.npy`` and ``scores.npy`` into ``directory``; scores must
    be finite."""
    directory = Path(directory)
    csr.validate(str(directory))
    require_finite(csr.scores, f"{directory}: scores")
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("indptr", "indices", "scores"):
        np.save(directory / f"{name}.npy", getattr(csr, name), allow_pickle=False)


def load_csr(directory: Path, mmap: bool = True) -> CSR:
    """Open a CSR written by :func:`save_csr`, memory-mapped unless ``mmap=False``."""
    directory = Path(directory)
    arrays = {}
    for name in ("indptr", "indices", "scores"):
        arrays[name] = _load_npy(directory / f"{name}.npy", mmap)
    csr = CSR(**arrays)
    csr.validate(str(directory))
    return csr


def _load_npy(path: Path, mmap: bool) -> npt.NDArray[Any]:
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (an incomplete or damaged build; rebuild it)")
    try:
        arr: npt.NDArray[Any] = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ArtifactError(f"{path}: not a readable .npy file ({exc})") from exc
    return serving_view(arr)


_MADV_POPULATE_READ = 22  # Linux 5.14+; Python 3.11's mmap module has no name for it


def serving_view(arr: npt.NDArray[Any], fill: bool = True) -> npt.NDArray[Any]:
    """A memory-mapped array as it is served: a plain ndarray over the same mapping, with this
    process's page tables filled for all of it now (unless ``fill`` is False).

    Every slice of an ``np.memmap`` is another memmap, built through Python-level
    ``__getitem__``/``__array_finalize__`` (a visible share of a blend). And a fresh process
    otherwise faults each page in on its first touch, so its first blends ran well behind the
    steady ones at 10M items (benchmarks/README.md). The files are read into the page cache at
    load anyway (``prefetch_page_cache``); this maps them. Linux only: elsewhere, or before
    kernel 5.14, pages are mapped as they are touched, as before.
    """
    if not isinstance(arr, np.memmap):
        return arr
    mapping = getattr(arr, "_mmap", None)
    if fill and mapping is not None and sys.platform == "linux":
        with contextlib.suppress(OSError, ValueError):  # an older kernel: EINVAL
            mapping.madvise(_MADV_POPULATE_READ)
    return arr.view(np.ndarray)


def map_in_full(path: Path) -> None:
    """``serving_view``'s page-table fill for the mappings a library made of ``path`` itself
    (faiss maps its index file): found in ``/proc/self/maps``. Linux only; a no-op elsewhere."""
    if sys.platform != "linux":
        return
    target = str(Path(path).resolve())
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = [line.split(maxsplit=5) for line in maps]
    except OSError:
        return
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    for fields in lines:
        if len(fields) == 6 and fields[5].rstrip("\n") == target:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_POPULATE_READ)


# --------------------------------------------------------------------------------------------
# id maps


class IdMap:
    """External ids (int64 or str) <-> dense int32 indices.

    The external ids are kept as one sorted, unique numpy array, so a dense id is a position and a
    lookup is ``np.searchsorted``: vectorised, no dict of 10M Python objects, and it works on a
    memory-mapped array shared between processes.
    """

    __slots__ = ("values",)

    def __init__(self, values: npt.NDArray[Any]) -> None:
        """Wrap an already sorted, unique array (use :meth:`from_values` for raw ids)."""
        if values.ndim != 1:
            raise ArtifactError(f"IdMap values must be 1-D, found shape {values.shape}")
        if values.dtype != np.int64 and values.dtype.kind != "U":
            raise ArtifactError(f"IdMap values must be int64 or unicode, found {values.dtype}")
        if values.shape[0] > np.iinfo(np.int32).max:
            raise ArtifactError(f"IdMap holds {values.shape[0]} ids, more than int32 indexes")
        self.values = values

    @classmethod
    def from_values(cls, values: npt.ArrayLike) -> tuple[IdMap, npt.NDArray[np.int32]]:
        """The map of the distinct ``values`` and the dense code of every input value.

        The ids follow the one id rule (:mod:`retrieval.ids`): a bool, float, None, empty string
        or out-of-int64 value, or ints mixed with non-numeric strings, raise ``IdError``.
        """
        arr = _canonical(values)
        if arr.dtype.kind == "U" and arr.shape[0] > 0:
            # Arrow hashes strings much faster than numpy sorts them; sort only the distinct ones.
            import pyarrow as pa  # only builds map strings this way: serving never loads Arrow
            import pyarrow.compute as pc

            enc = pc.dictionary_encode(pa.array(arr, type=pa.string()))
            order = np.asarray(pc.sort_indices(enc.dictionary))
            rank = np.empty(order.shape[0], dtype=np.int32)
            rank[order] = np.arange(order.shape[0], dtype=np.int32)
            uniq = enc.dictionary.take(pa.array(order)).to_numpy(zero_copy_only=False).astype(str)
            codes = rank[enc.indices.to_numpy()]
            return cls(uniq), codes
        uniq, inverse = np.unique(arr, return_inverse=True)
        return cls(uniq), inverse.reshape(-1).astype(np.int32)

    @property
    def is_str(self) -> bool:
        """True for a map of string ids, False for int64 ids: decides how lookups are coerced."""
        return self.values.dtype.kind == "U"

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __repr__(self) -> str:
        return f"IdMap(n={len(self)}, dtype={self.values.dtype})"

    def to_dense(self, ids: npt.ArrayLike, missing: int = -1) -> npt.NDArray[np.int32]:
        """Dense indices of ``ids``; ids not in the map (or of an unusable kind) get ``missing``.

        Ids are spelled in the map's kind by the one id rule, because they arrive from JSON,
        URLs and YAML: canonical int text against an int map is parsed (``"42"`` finds 42, but
        ``"+5"``, ``" 7"`` and ``"00123"`` are strings, so not there), ints against a str map are
        ``str()``-ed; bools, floats and None are never ids, so they are missing.
        """
        if not self.is_str and isinstance(ids, np.ndarray) and ids.dtype == np.int64:
            return kernels.lookup_sorted(self.values, ids.reshape(-1), missing)
        ok, q = self._coerce(ids)
        out = np.full(ok.shape[0], missing, dtype=np.int32)
        if len(self) == 0 or not ok.any():
            return out
        sub = q[ok] if not ok.all() else q
        pos = np.searchsorted(self.values, sub)
        pos_c = np.minimum(pos, len(self) - 1)
        hit = self.values[pos_c] == sub
        res = np.where(hit, pos_c, missing).astype(np.int32)
        out[ok] = res
        return out

    def _coerce(self, q: npt.ArrayLike) -> tuple[npt.NDArray[np.bool_], npt.NDArray[Any]]:
        """Which query ids can be looked up, and the queries in the map's dtype."""
        ok, keys = id_keys(q, as_str=self.is_str)
        if not self.is_str:
            return ok, keys
        width = self.values.dtype.itemsize // 4
        if keys.dtype.itemsize // 4 > width:
            # Longer than any stored id, so not in the map; casting down would truncate them
            # into false matches, casting the map up would copy all of it.
            ok &= np.char.str_len(keys) <= width
        return ok, keys.astype(self.values.dtype)

    def to_external(self, dense: npt.ArrayLike) -> npt.NDArray[Any]:
        """External ids of dense indices (raises IndexError on out-of-range indices)."""
        idx = np.asarray(dense)
        if not self.is_str and idx.dtype == np.int32 and idx.ndim == 1:
            bad, out = kernels.gather_ids(self.values, idx)
            if bad < 0:
                return out
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(
                f"dense ids must lie in [0, {len(self)}), got {idx.min()}..{idx.max()}"
            )
        return self.values[idx]

    def save(self, path: Path) -> None:
        """One ``.npy`` file; the sorted array is the whole state."""
        np.save(Path(path), np.ascontiguousarray(self.values), allow_pickle=False)

    @classmethod
    def load(cls, path: Path, mmap: bool = True) -> IdMap:
        """Open a map written by :meth:`save` (memory-mapped unless ``mmap=False``)."""
        arr = _load_npy(Path(path), mmap)
        try:
            return cls(arr)
        except ArtifactError as exc:
            raise ArtifactError(f"{path}: {exc}") from exc


def _canonical(values: npt.ArrayLike) -> npt.NDArray[Any]:
    """int64 for integer ids, unicode for string ids: the one id rule (``retrieval.ids``)."""
    return id_array(values, "ids")


# --------------------------------------------------------------------------------------------
# manifest


def new_build_id() -> str:
    """A fresh build id: UTC time (so builds sort by age) and 8 random hex digits."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"


class FileSum(BaseModel):
    """One file as the builder wrote it: its size and SHA-256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SourceEntry(BaseModel):
    """What one source was built with, so a changed config is caught at load time, and what it
    wrote, so a damaged file or a directory of another build is caught too.

    ``files`` are paths relative to the source's directory; ``build_id`` is the build that wrote
    the directory (its ``BUILD_ID`` stamp: a source kept by ``--only`` keeps its own);
    ``id_maps`` are the SHA-256 of the id maps its dense ids index, which must be this build's.
    """

    model_config = ConfigDict(extra="forbid")

    kind: str
    params_hash: str
    params: dict[str, Any] = Field(default_factory=dict)
    stats: dict[str, Any] = Field(default_factory=dict)
    build_id: str = ""
    files: dict[str, FileSum] = Field(default_factory=dict)
    id_maps: dict[str, str] = Field(default_factory=dict)


class Manifest(BaseModel):
    """``manifest.json``: written last, so its presence means the build completed.

    ``files`` are the build's shared files (the id maps), relative to the build directory.
    """

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    package_version: str
    build_id: str = Field(default_factory=new_build_id)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    input: dict[str, Any] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)
    files: dict[str, FileSum] = Field(default_factory=dict)
    sources: dict[str, SourceEntry] = Field(default_factory=dict)

    def add_source(
        self,
        name: str,
        kind: str,
        params: Mapping[str, Any],
        stats: Mapping[str, Any] | None = None,
    ) -> SourceEntry:
        """Record a built source with the hash :func:`check_source` compares against."""
        plain = json.loads(_canonical_json(params))
        entry = SourceEntry(
            kind=kind, params_hash=params_hash(kind, params), params=plain, stats=dict(stats or {})
        )
        self.sources[name] = entry
        return entry

    def to_json(self) -> str:
        """The text of ``manifest.json``: sorted keys and numpy values made plain, so two
        manifests of the same build diff cleanly. Raises TypeError on a value JSON cannot hold."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True, default=_jsonable)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, set, frozenset)):
        return str(obj) if isinstance(obj, Path) else sorted(obj)
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _canonical_json(obj: Any) -> str:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_jsonable
    )


def params_hash(kind: str, params: Mapping[str, Any]) -> str:
    """A stable hash of a source's kind and params (key order and whitespace do not matter)."""
    blob = _canonical_json({"kind": kind, "params": dict(params)})
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def fingerprint(path: Path) -> dict[str, Any]:
    """Identify an input file cheaply: size, mtime and a hash of its first and last MiB.

    Hashing all of a multi-GB log would cost as long as reading it; the ends catch appends,
    truncation and replacement, which are the changes that happen to event logs.
    """
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        if st.st_size > _FINGERPRINT_BYTES:
            f.seek(max(_FINGERPRINT_BYTES, st.st_size - _FINGERPRINT_BYTES))
            h.update(f.read(_FINGERPRINT_BYTES))
    return {
        "path": str(path.resolve()),
        "size_bytes": int(st.st_size),
        "mtime": float(st.st_mtime),
        "sha256_head_tail": h.hexdigest(),
    }


# --------------------------------------------------------------------------------------------
# checksums
#
# SHA-256, chosen by measurement (benchmarks/README.md): on x86 with SHA extensions it costs
# little more than the read that fills the page cache anyway, and beat every other hash but
# sha1 and crc32; it is collision resistant (crc32 is not, and 32 bits over a multi-GB build is
# thin) and any tool checks it (``sha256sum``). Without SHA extensions blake2b would be the
# faster choice.


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _fresh_digest(st: os.stat_result) -> str | None:
    """The SHA-256 this process computed for this very file (same inode, size and mtime)
    within the last ``_FRESH_S`` seconds, or None."""
    with _verified_lock:
        hit = _verified.get(_stat_key(st))
    if hit is None or time.monotonic() - hit[1] > _FRESH_S:
        return None
    return hit[0]


def _describe(mode: int) -> str:
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def _regular_stat(path: Path) -> os.stat_result:
    """``stat`` of a regular file (links followed), or an ArtifactError; never opens it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ArtifactError(
            f"{path}: missing or unreadable ({exc.strerror}); the build is incomplete or "
            "damaged: rebuild it"
        ) from exc
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(
            f"{path}: {_describe(st.st_mode)}, not a regular file; refusing to open it: rebuild"
        )
    return st


def _read_regular(
    path: Path, buf: bytearray, sink: Callable[[memoryview], object] | None = None
) -> tuple[os.stat_result, int]:
    """Read a regular file through ``buf`` (each chunk to ``sink``); its stat and bytes read.

    Opened non-blocking and checked with ``fstat`` before the first read, so a FIFO swapped in
    after a ``stat`` can neither block the open nor be read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{path}: {_describe(st.st_mode)}, not a regular file")
        view = memoryview(buf)
        total = 0
        while n := os.readv(fd, [buf]):
            if sink is not None:
                sink(view[:n])
            total += n
        return st, total
    finally:
        os.close(fd)


def file_sum(path: Path, *, sync: bool = False) -> FileSum:
    """Size and SHA-256 of a regular file (read in full; with ``sync``, flushed to disk first).

    The result is remembered for this process (unless the file was modified in the last two
    seconds), so checking the same unchanged file again soon (:func:`verify_file`) does not read
    it twice.
    """
    path = Path(path)
    _regular_stat(path)
    if sync:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    h = hashlib.sha256()
    try:
        st, n = _read_regular(path, bytearray(_HASH_CHUNK), h.update)
        after = os.stat(path)
    except OSError as exc:
        raise ArtifactError(f"{path}: unreadable ({exc.strerror}); rebuild") from exc
    if n != st.st_size or _stat_key(after) != _stat_key(st):
        raise ArtifactError(f"{path}: changed while it was being read; is a build still running?")
    digest = h.hexdigest()
    if time.time_ns() - st.st_mtime_ns > _RACY_NS:
        with _verified_lock:
            _verified[_stat_key(st)] = (digest, time.monotonic())
    return FileSum(size=n, sha256=digest)


def verify_file(path: Path, expected: FileSum) -> None:
    """Raise ArtifactError naming the file, the expected and the found size or SHA-256 unless
    ``path`` is a regular file with exactly the content the manifest recorded."""
    path = Path(path)
    st = _regular_stat(path)
    if st.st_size != expected.size:
        raise ArtifactError(
            f"{path}: {st.st_size} bytes, the manifest expects {expected.size} bytes (sha256 "
            f"{expected.sha256}); the file is truncated, damaged or from another build: rebuild"
        )
    found = _fresh_digest(st) or file_sum(path).sha256
    if found != expected.sha256:
        raise ArtifactError(
            f"{path}: sha256 {found}, the manifest expects sha256 {expected.sha256}; the file is "
            "damaged or from another build: rebuild"
        )


def _member(root: Path, rel: str, where: str) -> Path:
    """``root / rel`` for a relative path that stays inside ``root`` (manifests are input)."""
    parts = PurePosixPath(rel).parts
    if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
        raise ArtifactError(f"{where}: {rel!r} is not a path inside the build; rebuild")
    return root.joinpath(*parts)


def _check_stamp(directory: Path, entry: SourceEntry, name: str) -> None:
    """The source directory must carry the build id its manifest entry records."""
    if not entry.files and not os.path.lexists(directory):
        return  # nothing was written, so nothing can be served from another build
    stamp = directory / STAMP_NAME
    try:
        st = _regular_stat(stamp)
        if st.st_size > _MAX_STAMP:
            raise ArtifactError(f"{stamp}: {st.st_size} bytes, not a build id")
        with stamp.open("rb") as f:
            found = f.read(_MAX_STAMP).decode("utf-8", "replace").strip()
    except ArtifactError as exc:
        raise ArtifactError(
            f"source {name!r}: {directory} has no readable {STAMP_NAME} stamp ({exc}); it was "
            "not written by the build this manifest describes: rebuild"
        ) from exc
    if found != entry.build_id:
        raise ArtifactError(
            f"source {name!r}: {directory} was written by build {found!r}, but this manifest's "
            f"entry for it was written by build {entry.build_id!r}: a directory from another "
            "build; rebuild"
        )


def verify_build(root: Path, manifest: Manifest, sources: Iterable[str] | None = None) -> int:
    """Check files against ``manifest`` before any of them is mapped or opened by a native
    library; the bytes checked (0 for files this process checksummed moments ago).

    The shared files (the id maps) and every file of ``sources`` (default: all) must match the
    sizes and SHA-256 recorded at build time; each source directory must carry its build's
    ``BUILD_ID`` stamp and have been built on this build's id maps. The first mismatch raises
    ArtifactError naming the file, the expected and the found value. Files are read in up to
    ``_VERIFY_THREADS`` threads (hashlib releases the GIL), which also fills the page cache, so
    :func:`prefetch_page_cache` skips them afterwards.
    """
    root = Path(root)
    jobs = [(_member(root, rel, str(root)), fs) for rel, fs in sorted(manifest.files.items())]
    names = sorted(manifest.sources) if sources is None else list(sources)
    for name in names:
        entry = _entry(manifest, name)
        directory = _member(root, name, f"source {name!r}")
        _check_stamp(directory, entry, name)
        for rel, digest in sorted(entry.id_maps.items()):
            shared = manifest.files.get(rel)
            if shared is None or shared.sha256 != digest:
                found = "none" if shared is None else f"sha256 {shared.sha256}"
                raise ArtifactError(
                    f"source {name!r} was built on {rel} with sha256 {digest}, this build's "
                    f"{rel} has {found}: its dense ids would name other items; rebuild"
                )
        jobs += [(_member(directory, rel, str(directory)), fs) for rel, fs in entry.files.items()]
    unique = {str(path): (path, fs) for path, fs in jobs}
    ordered = sorted(unique.values(), key=lambda job: -job[1].size)  # the longest first
    total = sum(fs.size for _, fs in ordered)
    threads = min(_VERIFY_THREADS, len(os.sched_getaffinity(0)), len(ordered))
    if threads <= 1 or total < _PARALLEL_BYTES:
        for path, fs in ordered:
            verify_file(path, fs)
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="verify") as pool:
            futures = [pool.submit(verify_file, path, fs) for path, fs in ordered]
            try:
                for future in futures:
                    future.result()  # re-raises the first failure, in order
            except BaseException:
                for future in futures:
                    future.cancel()  # files not started yet are not read
                raise
    return total


def resolve_build(directory: Path) -> Path:
    """The build ``directory`` names right now, with every link resolved.

    ``retrieval build`` publishes by replacing the link ``<out>`` atomically, so a reader that
    resolves it once and loads everything (manifest, sources, id maps) from the result never
    mixes two builds, however often builds are published meanwhile. A plain directory (the
    layout of builds before version 2, or one assembled by hand) is itself.
    """
    return Path(os.path.realpath(directory))


def source_root(artifacts: Path, name: str) -> Path:
    """The build directory source ``name`` loads from (``root / name`` and ``root / "ids"``),
    its files checked before the caller maps any of them or hands one to a native library.

    Resolves ``artifacts`` once (:func:`resolve_build`) and, when it holds a manifest, checks
    the source's stamp, the id maps it was built on and every file's size and SHA-256
    (:func:`verify_build`; files this process checked moments ago, e.g. by
    :func:`open_artifacts`, are not read again). A directory without a manifest, as unit tests
    lay out a single source, is returned unchecked: there is nothing to check it against, and
    the Retriever never serves one (:func:`open_artifacts` refuses it).
    """
    root = resolve_build(artifacts)
    if not os.path.lexists(root / MANIFEST_NAME):
        return root
    verify_build(root, open_artifacts(root, verify=False), [name])
    return root


def _walk(directory: Path, skip: frozenset[str] = frozenset()) -> Iterator[Path]:
    """Every non-directory below ``directory`` (links followed, each directory once, sorted),
    except the top-level names in ``skip``. Nothing is opened: callers check the file type."""
    seen: set[tuple[int, int]] = set()
    stack = [(directory, True)]
    while stack:
        current, top = stack.pop()
        try:
            st = os.stat(current)
            entries = sorted(os.scandir(current), key=lambda e: e.name, reverse=True)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:  # a link loop, or a directory linked twice
            continue
        seen.add((st.st_dev, st.st_ino))
        files = []
        for e in entries:
            if top and e.name in skip:
                continue
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                stack.append((Path(e.path), False))
            else:
                files.append(Path(e.path))
        yield from reversed(files)


def _listed_files(root: Path) -> list[Path] | None:
    """The manifest and every file it lists, or None when ``root`` has no usable manifest."""
    try:
        manifest = open_artifacts(root, verify=False)
        paths = [root / MANIFEST_NAME]
        paths += [_member(root, rel, str(root)) for rel in manifest.files]
        for name, entry in manifest.sources.items():
            directory = _member(root, name, str(root))
            paths += [_member(directory, rel, str(directory)) for rel in entry.files]
    except ArtifactError:
        return None
    return paths


def prefetch_page_cache(directory: Path, chunk_bytes: int = _HASH_CHUNK) -> int:
    """Read every artifact file once so its pages sit in the shared page cache; bytes read.

    Serving maps artifacts instead of reading them, so a cold page cache turns the first
    requests' lookups into random disk reads: at 10M items every source timed out during the
    warm-up and its circuit breaker opened, and a 1M-item faiss index answered orders of
    magnitude slower than warm. Reading into a scratch buffer fills the page cache only: no
    process's RSS grows until it touches a page. Symlinks are followed (a serving directory may
    link its parts).

    With a manifest, only the files it lists are read (a stray file is never served, so never
    worth the time); without one, every file. Only regular files are opened: a FIFO would block
    the read for as long as nobody writes to it (it held startup until the wait timed out).
    Files this process has just checksummed (:func:`verify_build`) were read doing so, and are
    skipped.
    """
    root = Path(directory)
    listed = _listed_files(resolve_build(root))
    paths = _walk(root) if listed is None else iter(listed)
    buf = bytearray(chunk_bytes)
    total = 0
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:  # a broken link or an unreadable file: loading will say so
            continue
        if not stat.S_ISREG(st.st_mode):
            logger.warning(
                "prefetch: skipped %s: %s, not a regular file", path, _describe(st.st_mode)
            )
            continue
        if _fresh_digest(st) is not None:
            continue
        try:
            total += _read_regular(path, buf)[1]
        except (OSError, ArtifactError):
            continue
    return total


def open_artifacts(directory: Path, *, verify: bool = True) -> Manifest:
    """The manifest of a complete build of the current format, or a clear ArtifactError.

    ``directory`` is resolved once (:func:`resolve_build`). With ``verify`` (the default) every
    file the manifest lists is checked first (:func:`verify_build`: sizes, SHA-256, build
    stamps, id maps), which reads the whole build once and so also fills the page cache.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory; run `retrieval build`")
    root = resolve_build(directory)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{directory}: no {MANIFEST_NAME}: not a complete build; run `retrieval build`"
        )
    raw = read_versioned_json(path, FORMAT_VERSION, "artifact manifest")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{path}: malformed manifest: {exc}") from exc
    if verify:
        verify_build(root, manifest)
    return manifest


def _entry(manifest: Manifest, name: str) -> SourceEntry:
    """Source ``name``'s manifest entry, or the error that says it was not built."""
    entry = manifest.sources.get(name)
    if entry is None:
        built = ", ".join(sorted(manifest.sources)) or "none"
        raise ArtifactError(
            f"source {name!r} has no artifacts in this build (built: {built}); "
            "rebuild with `retrieval build`"
        )
    return entry


def check_source(manifest: Manifest, name: str, kind: str, params_hash: str) -> None:
    """Refuse artifacts built for another config of source ``name``."""
    entry = _entry(manifest, name)
    if entry.kind != kind:
        raise ArtifactError(
            f"source {name!r} was built as kind {entry.kind!r} but is configured as {kind!r}; "
            "rebuild with `retrieval build`"
        )
    if entry.params_hash != params_hash:
        raise ArtifactError(
            f"source {name!r} was built with other params (hash {entry.params_hash}, config "
            f"has {params_hash}); rebuild with `retrieval build`"
        )


def seal_build(root: Path, manifest: Manifest) -> None:
    """Record what the build in ``root`` wrote: the size and SHA-256 of every shared file in
    ``manifest.files``, and for every source built now (not one carried over from an earlier
    build, which keeps its own) a ``BUILD_ID`` stamp in its directory, its files' checksums and
    the checksums of the id maps it was built on. Files are flushed to disk first, so a
    published build is on disk whole. Anything but regular files and directories is refused.
    """
    root = Path(root)
    names = frozenset(manifest.sources)
    for name in names:
        if "/" in name:
            raise ArtifactError(f"source name {name!r} cannot name a directory of the build")
        _member(root, name, "source")
    shared = {}
    for path in _walk(root, skip=names | {MANIFEST_NAME}):
        shared[path.relative_to(root).as_posix()] = file_sum(path, sync=True)
    manifest.files = shared
    maps = {rel: fs.sha256 for rel, fs in shared.items() if rel.startswith("ids/")}
    for name, entry in manifest.sources.items():
        if entry.build_id and entry.build_id != manifest.build_id and entry.files:
            continue  # carried over (ArtifactWriter.carry_over): sealed by its own build
        entry.build_id = manifest.build_id
        entry.id_maps = dict(maps)
        directory = root / name
        if not directory.is_dir():
            entry.files = {}
            continue
        stamp = directory / STAMP_NAME
        _write_text_durably(stamp, manifest.build_id + "\n")
        entry.files = {
            path.relative_to(directory).as_posix(): file_sum(path, sync=True)
            for path in _walk(directory, skip=frozenset({STAMP_NAME}))
        }


# --------------------------------------------------------------------------------------------
# atomic builds


class ArtifactWriter:
    """Write a build into a directory of its own and publish it in one atomic step.

    Layout: ``out`` (the path the user gave) is a symbolic link to
    ``.<out>.builds/<build-id>/`` beside it. A build is written into a fresh directory there,
    sealed (:func:`seal_build`) and its manifest written last; then a temporary link to it
    replaces ``out`` with one ``os.replace`` (a rename: atomic on POSIX). A reader sees the
    previous complete build or the new one, never a half, and a crash at any point leaves the
    previous build published. After the swap every build but the new one and the one it
    replaced is deleted (the previous one is kept: a reader that resolved the old link keeps
    its files). A lock file stops two builds writing one ``out`` at once, and each build starts
    by removing what a crashed one left: unfinished build directories, temporary links, and the
    ``.<out>.tmp-*`` directories of the writer before version 2.

    An ``out`` that is a plain directory with a manifest (the layout before version 2) becomes
    the previous build: swapped with the new link in one ``renameat2(RENAME_EXCHANGE)`` on
    Linux, moved then linked (two renames) elsewhere. A non-empty directory without a manifest
    is refused, never replaced. An ``out`` given as the build a link resolves to (a config's
    relative ``artifacts:`` is resolved) publishes through that link.
    """

    def __init__(self, out_dir: Path, manifest: Manifest | None = None) -> None:
        self.out_dir = _published_path(Path(out_dir))
        self.manifest = manifest
        self.build_id = ""
        self.previous: Path | None = None
        """The published build when this one started (resolved), or None."""
        self._tmp: Path | None = None
        self._lock_fd: int | None = None

    @property
    def builds_dir(self) -> Path:
        """``.<out>.builds`` beside ``out``: every build's own directory (and the lock) lives
        here, on the same file system as the link, so publishing stays one rename."""
        return self.out_dir.parent / f".{self.out_dir.name}.builds"

    @property
    def tmp(self) -> Path:
        """The directory the build is written into (published at the end of ``with``)."""
        if self._tmp is None:
            raise ArtifactError("ArtifactWriter.tmp is only available inside `with`")
        return self._tmp

    def __enter__(self) -> ArtifactWriter:
        out = self.out_dir
        if not out.is_symlink():
            if out.exists() and not out.is_dir():
                raise ArtifactError(f"{out}: exists and is not a directory")
            if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
                # Publishing would move it away: refuse to treat someone's directory as a build.
                raise ArtifactError(
                    f"{out}: not empty and has no {MANIFEST_NAME}, so it is not an artifact "
                    "directory; refusing to replace it (pick another output directory)"
                )
        self.builds_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self._clean_stale()
            published = (out / MANIFEST_NAME).is_file()
            self.previous = resolve_build(out) if published else None
            self.build_id = new_build_id()
            self._tmp = self.builds_dir / self.build_id
            self._tmp.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tmp = self.tmp
        self._tmp = None
        try:
            if exc_type is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            try:
                if self.manifest is None:
                    raise ArtifactError(f"{self.out_dir}: build finished without a manifest")
                self.manifest.build_id = self.build_id
                seal_build(tmp, self.manifest)
                _write_text_durably(tmp / MANIFEST_NAME, self.manifest.to_json())
                for directory, _, _ in os.walk(tmp):  # the new names, before the link to them
                    _fsync_dir(Path(directory))
                _fsync_dir(self.builds_dir)
                previous = self._publish(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            keep = {tmp.name}
            if previous is not None and previous.parent == resolve_build(self.builds_dir):
                keep.add(previous.name)
            with contextlib.suppress(OSError):  # published; the next build prunes again
                self._prune(keep)
        finally:
            self._unlock()

    def carry_over(self, previous: Path, name: str, entry: SourceEntry) -> None:
        """Put source ``name`` of the build at ``previous`` into this build unchanged: its
        stamp and listed files hard-linked (copied across filesystems), its manifest entry
        with its checksums and build id copied. Verify it first (:func:`verify_build`)."""
        if self.manifest is None:
            raise ArtifactError("ArtifactWriter.carry_over needs the writer's manifest")
        src = _member(Path(previous), name, "source")
        dst = _member(self.tmp, name, "source")
        for rel in (STAMP_NAME, *entry.files):
            target = _member(dst, rel, str(dst))
            target.parent.mkdir(parents=True, exist_ok=True)
            origin = _member(src, rel, str(src))
            try:
                os.link(origin, target, follow_symlinks=True)
            except OSError:  # another filesystem, or none with hard links
                shutil.copy2(origin, target)
        self.manifest.sources[name] = entry.model_copy(deep=True)

    # ---- internals ---------------------------------------------------------------------

    def _lock(self) -> None:
        path = self.builds_dir / _LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ArtifactError(
                f"{self.out_dir}: another build is writing it (it holds {path}); wait for it"
            ) from exc
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _clean_stale(self) -> None:
        """Remove what crashed builds left (the lock says none is running now)."""
        out, builds = self.out_dir, self.builds_dir
        current = resolve_build(out) if os.path.lexists(out) else None
        for entry in os.scandir(builds):
            path = Path(entry.path)
            if entry.name == _LOCK_NAME or resolve_build(path) == current:
                continue
            if not entry.is_dir(follow_symlinks=False) or not (path / MANIFEST_NAME).is_file():
                logger.info("removing unfinished build %s", path)
                _remove(path)
        for entry in os.scandir(out.parent):
            if entry.name.startswith((f".{out.name}.link-", f".{out.name}.tmp-")):
                logger.info("removing what a crashed build left: %s", entry.path)
                _remove(Path(entry.path))
            elif entry.name.startswith(f".{out.name}.old-"):
                # The two-rename writer's backup: the only copy of a build if it crashed
                # between its renames. Kept as an old build until this one is published.
                old = Path(entry.path)
                if (old / MANIFEST_NAME).is_file() and not os.path.lexists(out):
                    os.rename(old, builds / f"legacy-{entry.name.rsplit('-', 1)[-1]}")
                else:
                    _remove(old)

    def _publish(self, tmp: Path) -> Path | None:
        """Point ``out`` at ``tmp`` in one step; the build it named before (resolved)."""
        out = self.out_dir
        previous = resolve_build(out) if os.path.lexists(out) else None
        link = out.parent / f".{out.name}.link-{self.build_id}"
        os.symlink(os.path.relpath(tmp, out.parent), link)
        try:
            if out.is_symlink() or not os.path.lexists(out):
                os.replace(link, out)
            elif not any(out.iterdir()):
                os.rmdir(out)
                os.replace(link, out)
            else:  # a build of the layout before version 2: a plain directory
                legacy = self.builds_dir / f"legacy-{self.build_id}"
                if _exchange(link, out):  # now `out` is the link, `link` the old directory
                    previous = None  # published: a failure from here on must not undo it
                    with contextlib.suppress(OSError):  # else the next build removes it
                        os.rename(link, legacy)
                        previous = legacy
                else:
                    os.rename(out, legacy)
                    os.replace(link, out)
                    previous = legacy
        except BaseException:
            if os.path.islink(link):
                os.unlink(link)
            raise
        _fsync_dir(out.parent)
        return previous

    def _prune(self, keep: set[str]) -> None:
        for entry in os.scandir(self.builds_dir):
            if entry.name != _LOCK_NAME and entry.name not in keep:
                logger.info("removing old build %s", entry.path)
                _remove(Path(entry.path))


def _published_path(out: Path) -> Path:
    """The link to publish through: ``out`` itself, or the link that resolves to ``out`` when
    ``out`` is a build inside a builds directory (a resolved relative ``artifacts:`` path)."""
    match = _BUILDS_DIR.fullmatch(out.parent.name)
    if match is None:
        return out
    link = out.parent.parent / match["name"]
    if link.is_symlink() and resolve_build(link) == resolve_build(out):
        return link
    raise ArtifactError(
        f"{out}: an older build kept inside {out.parent}, not a place to build into; "
        f"build into {link}"
    )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the C
    library or the filesystem cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return int(fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)) == 0


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _write_text_durably(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def build_params_hash_input(params: SourceParams) -> dict[str, Any]:
    """The params that shape the artifacts; serving-only knobs may change without a rebuild."""
    data = params.model_dump(mode="json")
    for key in getattr(type(params), "serving_params", frozenset()):
        data.pop(key, None)
    version = getattr(type(params), "build_version", 1)
    if version != 1:  # version 1 adds nothing: builds made before versions existed still match
        data["build_version"] = version
    return data


def check_built(manifest: Manifest, sc: SourceConfig) -> None:
    """Refuse artifacts of source ``sc`` that were built for other build params."""
    hashed = params_hash(sc.kind, build_params_hash_input(sc.resolved_params))
    check_source(manifest, sc.name, sc.kind, hashed)
