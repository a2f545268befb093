"""Keep passwords out of messages: redact URLs, scrub known secrets.

``urllib.parse.urlsplit`` ends the authority at the first ``/``, ``?`` or ``#``, so a password
holding one of them (``redis://u:pa/ss@host``, valid for redis-py once it is percent-decoded,
and a common typo when it is not) is read as a path and printed whole. Here the userinfo is
everything between ``://`` and the *last* ``@``: a host never holds an ``@``, and hiding too much
of a malformed URL is the safe way to be wrong.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, unquote

__all__ = ["redact", "redact_text", "secrets_of"]

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S*")
# A query password runs to the next parameter: it may hold an "@" (then it is not userinfo).
_QUERY_PASSWORD = re.compile(r"(?i)([?&;]password=)([^&;\s]*)")
_MIN_SCRUB = 4  # shorter known secrets are not scrubbed from free text (URLs are redacted anyway)


def _userinfo(rest: str) -> tuple[str | None, str]:
    """(userinfo or None, the rest) of what follows ``scheme://``, query passwords removed."""
    userinfo, at, host = rest.rpartition("@")
    return (userinfo, host) if at else (None, rest)


def redact(url: str) -> str:
    """``url`` with its password (userinfo, or a ``password=`` query value) replaced by ``***``.

    A user name is kept (``redis://user:***@host``); a lone userinfo may be a bare token
    (``redis://TOKEN@host``) and is hidden whole.
    """
    scheme, sep, rest = url.partition("://")
    rest = _QUERY_PASSWORD.sub(r"\1***", rest)
    if not sep:
        return rest
    userinfo, host = _userinfo(rest)
    if userinfo is None:
        return scheme + sep + rest
    user, colon, _ = userinfo.partition(":")
    return scheme + sep + (f"{user}:***@" if colon else "***@") + host


def secrets_of(url: str) -> list[str]:
    """Every spelling of the secrets in ``url`` (raw, decoded, encoded), longest first."""
    found = [m.group(2) for m in _QUERY_PASSWORD.finditer(url)]
    _, sep, rest = url.partition("://")
    if sep:
        userinfo, _ = _userinfo(_QUERY_PASSWORD.sub(r"\1", rest))
        if userinfo is not None:
            user, colon, password = userinfo.partition(":")
            found.append(password if colon else user)
    out: set[str] = set()
    for s in found:
        if s:
            out |= {s, unquote(s), quote(unquote(s), safe="")}
    return sorted((s for s in out if s), key=len, reverse=True)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every URL in it redacted and each known secret replaced by ``***``."""
    text = _URL.sub(lambda m: redact(m.group(0)), text)
    for s in sorted({s for s in secrets if len(s) >= _MIN_SCRUB}, key=len, reverse=True):
        for spelling in {s, repr(s)[1:-1]}:
            text = text.replace(spelling, "***")
    return text
