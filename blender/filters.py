"""Exclusions: items a slate must not contain, applied before the cut to k."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.errors import InputError
from retrieval.ids import id_array, id_keys, id_parts
from retrieval.types import ItemId

__all__ = ["Exclusions", "load_blocklist"]


def load_blocklist(path: Path) -> npt.NDArray[Any]:
    """One item id per line (blank lines and ``#`` comments ignored), by the one id rule: all
    canonical int text gives int64 ids, any other token makes the list strings."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"blend.blocklist: cannot read {path}: {exc}") from None
    tokens = [t for t in (line.split("#", 1)[0].strip() for line in lines) if t]
    return _sorted_unique(id_array(tokens, f"blend.blocklist ({path})"))


def _sorted_unique(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``np.unique`` without its overhead (numpy 2's hashing unique costs 20x a sort here)."""
    if a.size < 2:
        return a.copy()
    a = np.sort(a)
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a if keep.all() else a[keep]


def _member(keys: npt.NDArray[Any], banned: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Whether each key is in the sorted ``banned`` (binary search of the keys)."""
    pos = np.searchsorted(banned, keys)
    pos[pos == banned.size] = 0
    return np.asarray(banned[pos] == keys)


class Exclusions:
    """The union of the request's excludes, the seen items and the static blocklist.

    Built per request; the caller's own collections are only read. Ids are kept by what they
    mean under the one id rule (``retrieval.ids``): ints, together with the strings that spell
    them canonically, and the other strings. So an exclude of ``"42"`` removes item ``42`` and
    an exclude of ``42`` removes a string item ``"42"``, but ``"00123"`` never removes ``123``.
    Each part is a list of ids to look up, so kinds may mix (``[42, "sku-1"]``); bools, floats,
    None, empty strings and overflowing ints raise ``IdError``.

    Vectorised: 100k ids cost a sort, not a Python loop.
    """

    __slots__ = ("_ints", "_strs")

    def __init__(
        self, *parts: Collection[ItemId] | npt.NDArray[Any], names: Sequence[str] = ()
    ) -> None:
        """``names`` label the parts in errors (``request.history[3]: ...``); default
        ``exclude``."""
        ints: list[npt.NDArray[np.int64]] = []
        strs: list[npt.NDArray[np.str_]] = []
        for j, part in enumerate(parts):
            if not len(part):
                continue
            i, s = id_parts(part, names[j] if j < len(names) else "exclude", mixed=True)
            if i.size:
                ints.append(i)
            if s.size:
                strs.append(s)
        self._ints = _sorted_unique(_concat(ints)) if ints else np.empty(0, dtype=np.int64)
        self._strs = _sorted_unique(_concat(strs)) if strs else np.empty(0, dtype="<U1")

    @property
    def int_ids(self) -> npt.NDArray[np.int64]:
        """The excluded integer ids (with the strings that spell them), sorted: all an integer
        candidate can match."""
        return self._ints

    def __len__(self) -> int:
        """How many distinct ids are excluded (``42`` and ``"42"`` are one)."""
        return int(self._ints.size + self._strs.size)

    def _banned(self, ids: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        hit = np.zeros(ids.shape[0], dtype=bool)
        if self._ints.size:
            ok, keys = id_keys(ids, as_str=False)  # int64 ids pass through without a copy
            if ok.any():
                hit |= ok & _member(keys, self._ints)
        if self._strs.size and ids.dtype.kind not in "iu":  # an int never spells "00123"
            ok, keys = id_keys(ids, as_str=True)
            if ok.any():
                hit |= ok & _member(keys, self._strs)
        return hit

    def mask(self, ids: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """True where ``ids`` are allowed (binary search: cheaper than np.isin for small sets)."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size == 0 or len(self) == 0:
            return np.ones(ids.size, dtype=bool)
        return ~self._banned(ids)

    def allowed_sorted(self, uniq: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
        """Like ``mask`` for sorted unique ids, searching the few banned ids in them instead."""
        allowed = np.ones(uniq.size, dtype=bool)
        if uniq.size == 0 or len(self) == 0:
            return allowed
        if uniq.dtype.kind != "i" or self._ints.size >= uniq.size:
            return ~self._banned(uniq)  # string candidates, or more banned ids than candidates
        banned = self._ints
        pos = np.searchsorted(uniq, banned)
        inside = pos < uniq.size
        pos = pos[inside]
        allowed[pos[uniq[pos] == banned[inside]]] = False
        return allowed


def _concat(arrays: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
