"""Exclusions: items a slate must not contain, applied before the cut to k."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.types import ItemId, as_id_array

__all__ = ["Exclusions", "load_blocklist"]


def load_blocklist(path: Path) -> npt.NDArray[Any]:
    """One item id per line (blank lines and ``#`` comments ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"blend.blocklist: cannot read {path}: {exc}") from None
    ids: list[ItemId] = []
    for line in lines:
        token = line.split("#", 1)[0].strip()
        if token:
            ids.append(int(token) if token.lstrip("-").isdigit() else token)
    return np.unique(as_id_array(ids))


class Exclusions:
    """The union of the request's excludes, the seen items and the static blocklist.

    Built per request from small arrays; the caller's own collections are only read. Both an
    integer and a string spelling are kept, so an exclude of ``"42"`` removes item ``42``.
    """

    __slots__ = ("_as_int", "_as_str")

    def __init__(self, *parts: Collection[ItemId] | npt.NDArray[Any]) -> None:
        arrays = [as_id_array(p if isinstance(p, np.ndarray) else list(p)) for p in parts if len(p)]
        arrays = [a for a in arrays if a.size]
        ints = [a for a in arrays if a.dtype.kind in "iu"]
        strs = [a for a in arrays if a.dtype.kind in "US"]
        int_all = np.concatenate(ints) if ints else np.empty(0, np.int64)
        str_all = np.concatenate(strs) if strs else np.empty(0, dtype=str)
        numeric = np.array([s for s in str_all.tolist() if s.lstrip("-").isdigit()], dtype=np.int64)
        self._as_int = np.unique(np.concatenate([int_all, numeric]))
        self._as_str = np.unique(np.concatenate([str_all, int_all.astype(str)]))

    def __len__(self) -> int:
        return int(self._as_str.size)

    def mask(self, ids: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """True where ``ids`` are allowed (binary search: cheaper than np.isin for small sets)."""
        banned = self._as_int if ids.dtype.kind in "iu" else self._as_str
        if ids.size == 0 or banned.size == 0:
            return np.ones(ids.size, dtype=bool)
        pos = np.searchsorted(banned, ids)
        pos[pos == banned.size] = 0
        return banned[pos] != ids

    def allowed_sorted(self, uniq: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """Like ``mask`` for sorted unique ids, searching the few banned ids in them instead."""
        allowed = np.ones(uniq.size, dtype=bool)
        banned = self._as_int if uniq.dtype.kind in "iu" else self._as_str
        if uniq.size == 0 or banned.size == 0:
            return allowed
        pos = np.searchsorted(uniq, banned)
        inside = pos < uniq.size
        pos = pos[inside]
        allowed[pos[uniq[pos] == banned[inside]]] = False
        return allowed
