"""On-disk artifacts: CSR neighbour lists, id maps, the manifest and the atomic build directory.

Everything is plain ``.npy`` (opened with ``mmap_mode="r"`` so 10M-item artifacts load in
milliseconds and worker processes share the page cache) or JSON; pickles are never read or
written (``allow_pickle=False`` everywhere), so an artifact directory is safe to load from
anywhere and readable from any language.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "CSR",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "ArtifactError",
    "ArtifactWriter",
    "IdMap",
    "Manifest",
    "SourceEntry",
    "check_source",
    "fingerprint",
    "load_csr",
    "open_artifacts",
    "params_hash",
    "prefetch_page_cache",
    "save_csr",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_FINGERPRINT_BYTES = 1 << 20
_INT_ID = r"^\s*[+-]?\d{1,18}\s*$"
_INT_TEXT = re.compile(_INT_ID)
_SMALL = 1024  # ids per call below which parsing stays in Python


class ArtifactError(Exception):
    """An artifact that is missing, damaged, from another format version or another config."""


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
        return int(self.indptr.shape[0]) - 1

    @property
    def nnz(self) -> int:
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


def save_csr(directory: Path, csr: CSR) -> None:
    """Write ``indptr.npy``, ``indices.npy`` and ``scores.npy`` into ``directory``."""
    directory = Path(directory)
    csr.validate(str(directory))
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
    # A plain ndarray over the same mapping: every slice of an np.memmap is another memmap,
    # built through Python-level __getitem__/__array_finalize__ (6% of a blend's CPU at 1M).
    return arr.view(np.ndarray) if isinstance(arr, np.memmap) else arr


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
        """The map of the distinct ``values`` and the dense code of every input value."""
        arr = _canonical(np.asarray(values))
        if arr.dtype.kind == "U" and arr.shape[0] > 0:
            # Arrow hashes strings much faster than numpy sorts them; sort only the distinct ones.
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
        return self.values.dtype.kind == "U"

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __repr__(self) -> str:
        return f"IdMap(n={len(self)}, dtype={self.values.dtype})"

    def to_dense(self, ids: npt.ArrayLike, missing: int = -1) -> npt.NDArray[np.int32]:
        """Dense indices of ``ids``; ids not in the map (or of an unusable kind) get ``missing``.

        Ids are coerced to the map's kind, because they arrive from JSON, URLs and YAML: numeric
        strings against an int map are parsed, ints against a str map are ``str()``-ed.
        """
        q = np.asarray(ids)
        if q.ndim == 0:
            q = q.reshape(1)
        out = np.full(q.shape[0], missing, dtype=np.int32)
        if q.shape[0] == 0 or len(self) == 0:
            return out
        ok, q = self._coerce(q)
        if not ok.any():
            return out
        sub = q[ok] if not ok.all() else q
        pos = np.searchsorted(self.values, sub)
        pos_c = np.minimum(pos, len(self) - 1)
        hit = self.values[pos_c] == sub
        res = np.where(hit, pos_c, missing).astype(np.int32)
        out[ok] = res
        return out

    def _coerce(self, q: npt.NDArray[Any]) -> tuple[npt.NDArray[np.bool_], npt.NDArray[Any]]:
        """Which query ids can be looked up, and the queries in the map's dtype."""
        ok = np.ones(q.shape[0], dtype=bool)
        if q.dtype.kind == "O":
            q = _canonical(q)
        if self.is_str:
            if q.dtype.kind == "S":
                q = q.astype(str)
            elif q.dtype.kind != "U":
                q = q.astype(str)  # ints (and anything else) compare by their text
            width = self.values.dtype.itemsize // 4
            if q.dtype.itemsize // 4 > width:
                # Longer than any stored id, so not in the map; casting down would truncate them
                # into false matches, casting the map up would copy all of it.
                ok = np.char.str_len(q) <= width
            return ok, q.astype(self.values.dtype)
        if q.dtype.kind in "iub":
            return ok, q.astype(np.int64)
        if q.dtype.kind == "f":
            ok = np.isfinite(q) & (q == np.round(q)) & (np.abs(q) < 2.0**63)
            return ok, np.where(ok, q, 0).astype(np.int64)
        if q.dtype.kind in "US" and q.shape[0] <= _SMALL:
            # A request's few ids: plain Python beats Arrow's per-call setup by 100x.
            text = q.astype(str).tolist()
            ok = np.fromiter((_INT_TEXT.fullmatch(t) is not None for t in text), bool, len(text))
            return ok, np.fromiter(
                (int(t) if good else 0 for t, good in zip(text, ok.tolist(), strict=True)),
                np.int64,
                len(text),
            )
        if q.dtype.kind in "US":
            arr = pa.array(q.astype(str), type=pa.string())
            ok = np.asarray(pc.match_substring_regex(arr, _INT_ID))
            parsed = pc.cast(pc.utf8_trim_whitespace(pc.if_else(ok, arr, "0")), pa.int64())
            return ok, np.asarray(parsed)
        return np.zeros(q.shape[0], dtype=bool), np.zeros(q.shape[0], dtype=np.int64)

    def to_external(self, dense: npt.ArrayLike) -> npt.NDArray[Any]:
        """External ids of dense indices (raises IndexError on out-of-range indices)."""
        idx = np.asarray(dense)
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


def _canonical(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """int64 for integer ids, unicode for anything else (one canonical dtype per id kind)."""
    arr = arr.reshape(-1)
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "U":
        return arr
    if arr.dtype.kind == "O" and arr.shape[0]:
        as_list = arr.tolist()  # object arrays only come from small request-sized inputs
        if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in as_list):
            return np.asarray(as_list, dtype=np.int64)
    if arr.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    return arr.astype(str)


# --------------------------------------------------------------------------------------------
# manifest


class SourceEntry(BaseModel):
    """What one source was built with, so a changed config is caught at load time."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    params_hash: str
    params: dict[str, Any] = Field(default_factory=dict)
    stats: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    """``manifest.json``: written last, so its presence means the build completed."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    package_version: str
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())
    input: dict[str, Any] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)
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

    Hashing all of a 10 GB log would cost a minute; the ends catch appends, truncation and
    replacement, which are the changes that happen to event logs.
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


def prefetch_page_cache(directory: Path, chunk_bytes: int = 16 << 20) -> int:
    """Read every artifact file once so its pages sit in the shared page cache; bytes read.

    Serving maps artifacts instead of reading them, so a cold page cache turns the first
    requests' lookups into random disk reads: at 10M items every source timed out during the
    warm-up and its circuit breaker opened; a 1M-item faiss index answered in 10-190 ms instead
    of 2. Reading into a scratch buffer fills the page cache only: no process's RSS grows
    until it touches a page. Symlinks are followed (a serving directory may link its parts).
    """
    buf = bytearray(chunk_bytes)
    total = 0
    for root, _, files in os.walk(directory, followlinks=True):
        for name in files:
            try:
                with open(os.path.join(root, name), "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        total += n
            except OSError:  # a broken link or an unreadable file: loading will say so
                continue
    return total


def open_artifacts(directory: Path) -> Manifest:
    """The manifest of a complete build of the current format, or a clear ArtifactError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory; run `retrieval build`")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{directory}: no {MANIFEST_NAME}: not a complete build; run `retrieval build`"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}); rebuild the artifacts") from exc
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    found = raw.get("format_version")
    if found != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format_version {found!r}, but this code reads format_version "
            f"{FORMAT_VERSION}; rebuild with `retrieval build`"
        )
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{path}: malformed manifest: {exc}") from exc


def check_source(manifest: Manifest, name: str, kind: str, params_hash: str) -> None:
    """Refuse artifacts built for another config of source ``name``."""
    entry = manifest.sources.get(name)
    if entry is None:
        built = ", ".join(sorted(manifest.sources)) or "none"
        raise ArtifactError(
            f"source {name!r} has no artifacts in this build (built: {built}); "
            "rebuild with `retrieval build`"
        )
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


# --------------------------------------------------------------------------------------------
# atomic build directory


class ArtifactWriter:
    """Build into a temp directory next to ``out_dir`` and swap it into place on success.

    A crashed or failed build never leaves a half-written ``out_dir``: readers see either the old
    complete build or the new one. The temp directory sits in the same parent so the final
    ``rename`` stays on one filesystem (atomic, no copy).
    """

    def __init__(self, out_dir: Path, manifest: Manifest | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self._tmp: Path | None = None

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            raise ArtifactError("ArtifactWriter.tmp is only available inside `with`")
        return self._tmp

    def __enter__(self) -> ArtifactWriter:
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise ArtifactError(f"{out}: exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            # Swapping would delete it: refuse to treat someone's directory as an old build.
            raise ArtifactError(
                f"{out}: not empty and has no {MANIFEST_NAME}, so it is not an artifact "
                "directory; refusing to replace it (pick another output directory)"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tmp = self.tmp
        self._tmp = None
        if exc_type is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        try:
            if self.manifest is None:
                raise ArtifactError(f"{self.out_dir}: build finished without a manifest")
            _write_text_durably(tmp / MANIFEST_NAME, self.manifest.to_json())
            self._swap(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _swap(self, tmp: Path) -> None:
        out = self.out_dir
        if not out.exists():
            os.rename(tmp, out)
            _fsync_dir(out.parent)
            return
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        backup.rmdir()  # reserve a unique name; rename needs the target absent
        os.rename(out, backup)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(backup, out)  # put the previous build back before reporting
            raise
        _fsync_dir(out.parent)
        shutil.rmtree(backup, ignore_errors=True)


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
