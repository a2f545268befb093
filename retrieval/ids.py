"""The one id rule, used by the builds, ``record()``, exclusions, evaluation and the blender.

An item or user id is either an **int64** or a **non-empty string**; nothing else:

- Python/numpy integers within int64 (``uint64`` values above 2**63-1 are refused, never wrapped);
- strings; a string is the *spelling* of an integer only when it is canonical decimal text
  (``0|-?[1-9][0-9]*`` within int64, i.e. what ``str(int)`` writes). ``"00123"``, ``"+5"``,
  ``" 7"``, ``"-0"`` and ``"1e3"`` are strings, so zero-padded ids never merge with their
  numeric look-alikes;
- ``bool``, ``float``, ``None``, bytes and everything else raise :class:`IdError`.

One list holds one kind. A list of ints, or of canonical integer texts, is int64; a list of
strings with any non-canonical text is a list of strings; ints mixed with such strings raise.
Lookups (``to_dense``, exclusions) compare across kinds by this same rule: ``"42"`` finds 42.

Builds and requests validate with :func:`id_array` (or :func:`id_parts`, which also splits the
strings that spell ints from the others); lookups, which treat an unusable id as "not there"
instead of an error, spell their queries in the store's kind with :func:`id_keys`.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from retrieval.errors import IdError

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "INT_TEXT",
    "IdError",
    "check_id",
    "id_array",
    "id_keys",
    "id_parts",
    "int_spellings",
    "lookup_ids",
]

INT64_MAX = int(np.iinfo(np.int64).max)
INT64_MIN = int(np.iinfo(np.int64).min)
INT_TEXT = r"(?:0|-?[1-9][0-9]*)"
"""Canonical decimal text of an integer: the only strings that spell an int id."""
_INT_TEXT = re.compile(INT_TEXT)
_MAX_DIGITS = len(str(INT64_MAX))  # 19
_MAX_TEXT = _MAX_DIGITS + 1  # "-9223372036854775808"
_POW10 = 10 ** np.arange(_MAX_DIGITS + 1, dtype=np.uint64)  # 10**19 still fits in uint64
_CHUNK = 1 << 16  # rows per block of the vectorised parse (bounds its scratch memory)
_ALLOWED = "ids are int64 or non-empty strings"

IdArray = npt.NDArray[Any]
"""int64, or unicode (``<U``), one kind per array."""
IdsLike = npt.ArrayLike | Iterable[Any]
"""A list, tuple, set, array or iterable of ids (or one id)."""


def _int_of_text(text: str) -> int | None:
    """The int64 a string spells, or None when it is not canonical int64 text."""
    if len(text) > _MAX_TEXT or _INT_TEXT.fullmatch(text) is None:
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


def check_id(value: Any, what: str = "id") -> int | str:
    """One id, validated: an int within int64 or a non-empty string (returned unchanged)."""
    if isinstance(value, (bool, np.bool_)):
        raise IdError(f"{what}: {value!r} is a bool; {_ALLOWED}")
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if not INT64_MIN <= v <= INT64_MAX:
            raise IdError(f"{what}: {v} does not fit in int64; store such ids as strings")
        return v
    if isinstance(value, str):
        if not value:
            raise IdError(f"{what}: empty string is not an id")
        return value
    kind = "None" if value is None else type(value).__name__
    raise IdError(f"{what}: {value!r} is a {kind}; {_ALLOWED}")


# --------------------------------------------------------------------------------------------
# arrays


def _as_array(values: Any) -> npt.NDArray[Any]:
    """``values`` as a numpy array, without numpy's lossy guesses.

    ``np.asarray`` spells ``[1, "a"]`` as text, reads ``[True, 2]`` as ints and a huge int as
    uint64 or float. Lists of one plain kind take a C fast path (ints through ``array("q")``,
    which refuses floats, strings, None and overflow by itself; strings through ``np.fromiter``,
    6x ``np.asarray``); anything else becomes an object array judged element by element.
    """
    if isinstance(values, np.ndarray):
        return values
    if values is None or isinstance(values, (str, bytes, int, float, np.generic)):
        items: list[Any] = [values]
    elif isinstance(values, list):
        items = values
    else:
        items = list(values)
    n = len(items)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if isinstance(items[0], str):
        if all(issubclass(t, str) for t in set(map(type, items))):
            width = max(map(len, items))
            if width:
                return np.fromiter(items, dtype=f"<U{width}", count=n)
    else:
        try:
            ints = np.frombuffer(array("q", items), dtype=np.int64)
        except (TypeError, OverflowError):
            pass  # not all ints: judged one by one below, for the message
        else:
            # array("q") takes bools as ints: look at the elements that are 0 or 1.
            small = np.flatnonzero((ints >> 1) == 0)
            if small.size > 64:
                kinds = set(map(type, items))
            else:
                kinds = {type(items[i]) for i in small.tolist()}
            if not any(issubclass(t, (bool, np.bool_)) for t in kinds):
                return ints
    return np.fromiter(items, dtype=object, count=n)


def _as_1d(values: Any, what: str) -> npt.NDArray[Any]:
    arr = _as_array(values)
    if arr.ndim != 1:
        if arr.ndim == 0 or arr.size == 0:
            arr = arr.reshape(-1)
        else:
            raise IdError(f"{what}: expected a 1-D list of ids, got shape {arr.shape}")
    return arr


def _decode(arr: npt.NDArray[Any], what: str) -> npt.NDArray[np.str_]:
    if arr.dtype.kind == "U":
        return arr
    try:
        return arr.astype(str)
    except UnicodeDecodeError as exc:
        raise IdError(f"{what}: bytes that are not ASCII text ({exc}); {_ALLOWED}") from None


def _classify(
    values: Any, what: str
) -> tuple[IdArray, tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]] | None]:
    """The ids as :func:`id_array` returns them and, for string ids, which of them spell ints."""
    arr = _as_1d(values, what)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64), None
    kind = arr.dtype.kind
    if kind == "O":
        return _from_objects(arr, what)
    if kind == "i":
        return arr.astype(np.int64, copy=False), None
    if kind == "u":
        if arr.dtype.itemsize == 8:
            top = int(arr.max())
            if top > INT64_MAX:
                at = int(np.argmax(arr > INT64_MAX))
                raise IdError(
                    f"{what}[{at}]: {top} does not fit in int64; store such ids as strings"
                )
        return arr.astype(np.int64), None
    if kind in "US":
        return _from_texts(_decode(arr, what), what)
    if kind == "b":
        raise IdError(f"{what}: a bool array is not ids; {_ALLOWED}")
    if kind == "f":
        raise IdError(
            f"{what}: float ids are refused (1e20 and 1e20+1 are the same float); "
            "use int64 or strings"
        )
    raise IdError(f"{what}: dtype {arr.dtype} is not ids; {_ALLOWED}")


def _from_objects(
    arr: npt.NDArray[Any], what: str
) -> tuple[IdArray, tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]] | None]:
    items = arr.tolist()
    typed = _as_array(items)  # an object array of plain ints or plain strings: the fast path
    if typed.dtype.kind != "O":
        return _classify(typed, what)
    checked = [check_id(x, f"{what}[{i}]") for i, x in enumerate(items)]
    texts = [v for v in checked if isinstance(v, str)]
    if not texts:
        return np.asarray(checked, dtype=np.int64), None
    strs = np.asarray(texts, dtype=str)
    if len(texts) == len(checked):
        return _from_texts(strs, what)
    spelled = int_spellings(strs)
    if spelled is None or not spelled[0].all():
        bad = texts[0] if spelled is None else texts[int(np.argmin(spelled[0]))]
        raise IdError(f"{what}: mixes integer ids with string id {bad!r}; one list holds one kind")
    is_text = np.fromiter((isinstance(v, str) for v in checked), dtype=bool, count=len(checked))
    out = np.empty(len(checked), dtype=np.int64)
    out[is_text] = spelled[1]
    out[~is_text] = [v for v in checked if not isinstance(v, str)]
    return out, None


def _from_texts(
    texts: npt.NDArray[np.str_], what: str
) -> tuple[IdArray, tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]] | None]:
    """int64 when every text is canonical int64 text, else the strings (never empty ones)."""
    lengths = np.char.str_len(texts)
    if (lengths == 0).any():
        raise IdError(f"{what}[{int(np.argmin(lengths))}]: empty string is not an id")
    parsed = int_spellings(texts, lengths)
    if parsed is not None and parsed[0].all():
        return parsed[1], None
    return texts, parsed


def id_array(values: IdsLike, what: str = "ids") -> IdArray:
    """Ids as one 1-D numpy array of one kind: int64, or unicode strings.

    Integer dtypes are range-checked (no uint64 wrap-around); bool and float dtypes, ``None``,
    empty strings and ints mixed with non-numeric strings raise :class:`IdError` naming ``what``.
    A list of canonical integer texts (``["42", "7"]``) is int64.
    """
    return _classify(values, what)[0]


def id_parts(
    values: IdsLike, what: str = "ids", *, mixed: bool = False
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.str_]]:
    """Validated ids split by what they *mean*: the int ones (ints, and strings that spell an
    int) and the other strings. For sets that hold both kinds at once, like exclusions.

    Raises :class:`IdError` like :func:`id_array`. With ``mixed`` a list may hold both kinds:
    a request's history, seeds and exclusions are ids to look up, not a catalog to define, so
    ``[42, "sku-1"]`` is fine there (each id is still checked: no floats, bools, None).
    """
    if mixed:
        values = _as_1d(values, what)  # once: _classify takes the array as it is
        if values.dtype.kind == "O" and values.size:
            items = values.tolist()
            if _as_array(items).dtype.kind == "O":  # really both kinds (or junk): one by one
                checked = [check_id(x, f"{what}[{i}]") for i, x in enumerate(items)]
                texts = [v for v in checked if isinstance(v, str)]
                ints = np.asarray([v for v in checked if not isinstance(v, str)], dtype=np.int64)
                more, strs = id_parts(np.asarray(texts, dtype=str), what)
                return np.concatenate([ints, more]), strs
    arr, spelled = _classify(values, what)
    if arr.dtype.kind == "i":
        return arr, np.empty(0, dtype="<U1")
    if spelled is None:
        return np.empty(0, dtype=np.int64), arr
    ok, ints = spelled
    return ints[ok], arr[~ok]


def lookup_ids(values: IdsLike, what: str = "ids") -> IdArray:
    """A request's ids (history, seeds, exclusions) as one array to look up: int64 when every
    id means an int, else strings with the ints spelled canonically (``42`` -> ``"42"``, which
    an int map still finds). Each id is checked as by :func:`id_parts`; kinds may mix."""
    ints, strs = id_parts(values, what, mixed=True)
    if not strs.size:
        return ints
    if not ints.size:
        return strs
    items = _as_1d(values, what).tolist()
    return np.asarray([v if isinstance(v, str) else str(int(v)) for v in items], dtype=str)


def id_keys(values: IdsLike, as_str: bool) -> tuple[npt.NDArray[np.bool_], IdArray]:
    """Lookup keys: ``values`` spelled in one kind (unicode when ``as_str``, else int64), and
    which of them are ids of that kind at all.

    Never raises: lookups treat what is no id (a bool, a float, None, ``""``, a uint64 above
    int64, and against int keys any string that is not canonical int text, like ``"+5"`` or
    ``"00123"``) as not there. Ints are spelled as their canonical text for string keys.
    """
    arr = _as_array(values).reshape(-1)
    n = arr.shape[0]
    kind = arr.dtype.kind
    none = np.zeros(n, dtype=bool)
    empty: IdArray = np.zeros(n, dtype="<U1" if as_str else np.int64)
    if n == 0:
        return none, empty
    if kind == "O":
        typed = _as_array(arr.tolist())  # plain ints or plain strings take the vectorised path
        return _object_keys(arr, as_str) if typed.dtype.kind == "O" else id_keys(typed, as_str)
    if kind in "iu":
        ok = np.ones(n, dtype=bool)
        if kind == "u" and arr.dtype.itemsize == 8:
            ok = arr <= INT64_MAX
            arr = np.where(ok, arr, 0)
        ints = arr.astype(np.int64, copy=False)
        return ok, ints.astype(str) if as_str else ints
    if kind in "US":
        try:
            texts = arr.astype(str, copy=False)
        except UnicodeDecodeError:
            return none, empty
        if as_str:
            return np.char.str_len(texts) > 0, texts
        spelled = int_spellings(texts)
        return (none, empty) if spelled is None else spelled
    return none, empty  # bool, float, dates...: not ids


def _object_keys(arr: npt.NDArray[Any], as_str: bool) -> tuple[npt.NDArray[np.bool_], IdArray]:
    """Mixed Python objects (request-sized): judged one by one."""
    ok: list[bool] = []
    keys: list[Any] = []
    for x in arr.tolist():
        try:
            v: int | str | None = check_id(x)
        except IdError:
            v = None
        if v is not None and not as_str and isinstance(v, str):
            v = _int_of_text(v)
        ok.append(v is not None)
        keys.append(("" if v is None else str(v)) if as_str else (0 if v is None else v))
    return np.asarray(ok, dtype=bool), np.asarray(keys, dtype=str if as_str else np.int64)


# --------------------------------------------------------------------------------------------
# canonical int text, vectorised


def int_spellings(
    texts: npt.NDArray[np.str_],
    lengths: npt.NDArray[Any] | None = None,
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]] | None:
    """Which strings spell an int64 (canonically), and those ints (0 elsewhere).

    None when none can (a quick reject for string catalogs). Vectorised over the characters
    (no Python loop per string, no ``str -> int`` parse by numpy): 100k texts in a few ms.
    ``lengths`` (``np.char.str_len(texts)``) may be passed when the caller already has them.
    """
    texts = np.asarray(texts).reshape(-1)
    n = texts.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64)
    if texts.dtype.kind != "U":
        texts = texts.astype(str)
    if texts.dtype.itemsize == 0:
        return None
    if lengths is None:
        lengths = np.char.str_len(texts)
    ok = np.zeros(n, dtype=bool)
    values = np.zeros(n, dtype=np.int64)
    found = False
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        got = _spell_block(texts[start:stop], lengths[start:stop])
        if got is not None:
            ok[start:stop], values[start:stop] = got
            found = True
    return (ok, values) if found else None


def _spell_block(
    texts: npt.NDArray[np.str_], lengths: npt.NDArray[Any]
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]] | None:
    m = texts.shape[0]
    width = texts.dtype.itemsize // 4
    # Only the first 20 characters can belong to int64 text; longer strings fail on length.
    codes = np.ascontiguousarray(texts).view(np.uint32).reshape(m, width)[:, :_MAX_TEXT]
    first = codes[:, 0]
    rows = ((first - np.uint32(48)) < 10) | (first == 45)  # starts with a digit or "-"
    rows &= (lengths >= 1) & (lengths <= _MAX_TEXT)
    if not rows.any():
        return None  # the quick reject: "sku-1", "abc", ...
    idx = None if rows.all() else np.flatnonzero(rows)
    if idx is not None:
        codes, lengths = codes[idx], lengths[idx]
    codes = codes[:, : max(1, min(_MAX_TEXT, int(lengths.max())))]  # drop the NUL padding
    d = codes - np.uint32(48)  # digits 0-9; anything else wraps to >= 10
    digit = d < 10
    ndig = np.count_nonzero(digit, axis=1)
    neg = codes[:, 0] == 45
    # Every character but a leading "-" is a digit (an embedded NUL counts in the length and
    # is no digit); 1 to 19 digits; no leading zero except "0" itself (and never "-0").
    ok = (ndig == lengths - neg) & (ndig >= 1) & (ndig <= _MAX_DIGITS)
    lead = np.where(neg, d[:, min(1, d.shape[1] - 1)], d[:, 0])
    ok &= (lead != 0) | ((ndig == 1) & ~neg)
    mag = _magnitudes(np.multiply(d, digit, dtype=np.float64), lengths.astype(np.intp))
    ok &= mag <= np.where(neg, np.uint64(INT64_MAX) + np.uint64(1), np.uint64(INT64_MAX))
    if not ok.any():
        return None
    signed = np.where(ok, np.where(neg, np.negative(mag), mag), 0).view(np.int64)
    if idx is None:
        return ok, signed
    full_ok = np.zeros(m, dtype=bool)
    full_ok[idx] = ok
    values = np.zeros(m, dtype=np.int64)
    values[idx] = signed
    return full_ok, values


def _magnitudes(
    digits: npt.NDArray[np.float64], lengths: npt.NDArray[np.intp]
) -> npt.NDArray[np.uint64]:
    """The unsigned value of left-aligned digit rows (0 where no digit) of ``lengths`` chars.

    One BLAS product with fixed weights, exact in float64 (each sum < 10**10 < 2**53): ``a``
    reads the first ten columns and ``b`` the next ten as if every text were 20 long, so
    ``a = v * 10**(10-L)`` for ``L <= 10``, else ``v = a * 10**(L-10) + b / 10**(20-L)``; the
    divisions are exact. (Rows that are not int text get some value; callers mask them.)
    """
    w = digits.shape[1]
    weights = np.zeros((w, 2))
    weights[: min(w, 10), 0] = _W10[: min(w, 10)]
    if w > 10:
        weights[10:, 1] = _W10[: w - 10]
    ab = digits @ weights
    short = np.minimum(lengths, 10)
    out = (ab[:, 0] / _POW10F[10 - short]).astype(np.uint64)
    if w > 10:
        long = np.flatnonzero(lengths > 10)
        if long.size:
            n = np.minimum(lengths[long], _MAX_TEXT)
            out[long] = ab[long, 0].astype(np.uint64) * _POW10[n - 10] + (
                ab[long, 1] / _POW10F[_MAX_TEXT - n]
            ).astype(np.uint64)
    return out


_W10 = 10.0 ** np.arange(9, -1, -1)
_POW10F = 10.0 ** np.arange(_MAX_DIGITS + 2)
