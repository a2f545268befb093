"""One error tree for the whole project, so callers (and the CLI's exit codes) can tell a bad
input from a broken build from an unreachable store without parsing messages.

    RetrievalError
    ├── InputError (ValueError)        the caller's data or request is unusable
    │   ├── IdError                    an id breaks the one id rule (retrieval.ids)
    │   ├── RequestTooLarge            exclusions, seeds or history beyond the configured caps
    │   ├── ConfigError                a YAML file fails validation (retrieval.config)
    │   └── EventsError                an event log cannot be read (retrieval.offline.events)
    ├── ArtifactError                  a build is missing, foreign, stale or corrupt
    ├── StoreError (RuntimeError)      the online store failed or holds foreign data
    ├── SourceError                    a source broke its contract (blender boundary)
    └── ClosedError (RuntimeError)     a retriever used after ``close()``

Every class keeps a builtin base where callers already catch one (``ValueError`` for bad input),
so adopting the tree breaks no existing ``except``.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ClosedError",
    "IdError",
    "InputError",
    "RequestTooLarge",
    "RetrievalError",
    "SourceError",
    "StoreError",
    "exit_code",
]


class RetrievalError(Exception):
    """The root: everything this package raises on purpose."""


class InputError(RetrievalError, ValueError):
    """The caller's input cannot be used as given; the message names the field."""


class IdError(InputError):
    """An id is not an int64 or a string, overflows int64, or mixes kinds within one list."""


class RequestTooLarge(InputError):
    """A request carries more exclusions, seeds or history than the config allows."""


class ArtifactError(RetrievalError):
    """A build's files are missing, made for another config, or do not match their checksums."""


class StoreError(RetrievalError, RuntimeError):
    """The online store failed, timed out, or holds data this package did not write."""


class SourceError(RetrievalError):
    """A source returned something outside the contract (shape, ids, scores)."""


class ClosedError(RetrievalError, RuntimeError):
    """A ``Retriever`` (or its blender) was used after ``close()``."""


# The CLI's exit codes by class, most specific first: 2 = fix your input, 3 = rebuild,
# 4 = the store, 1 = anything else this package raised on purpose.
_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (InputError, 2),
    (ArtifactError, 3),
    (StoreError, 4),
    (RetrievalError, 1),
)


def exit_code(exc: BaseException) -> int:
    """The CLI exit code for an error of this package (1 when it is not one of ours)."""
    for cls, code in _EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1
