"""The one interface the ann source searches through, whatever the backend.

Three implementations, one module each: ``sources.ann_exact.ExactSearch`` (every item scored),
``sources.ann_faiss.FaissIVF`` (an inverted-file index) and ``sources.ann_annoy.AnnoySearch``
(random-projection trees). Each is opened once by ``sources.ann.AnnSource`` from a build's
sidecar and files; ``AnnSource.retrieve`` then only calls ``search``.

The signature is the one serving uses: one query per request (the blender calls sources once
per request, and annoy has no batch search), at most ``k`` rows back (annoy and faiss may find
fewer), and the deadline, so that a backend with a speed/recall knob (annoy's ``search_k``,
faiss's ``nprobe``) can turn it down when little time is left.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from retrieval.types import Deadline

__all__ = ["SELF_CHECK_TOL", "TIGHT_MS", "VectorIndex", "scaled_to_deadline", "unit_rows"]

TIGHT_MS = 5.0
"""Below this many ms left, a backend's search knob shrinks in proportion to the time left."""

SELF_CHECK_TOL = 0.02
"""A load-time self-check hit counts at this distance (relative to ``|v|``) from item 0."""


@runtime_checkable
class VectorIndex(Protocol):
    """Top-``k`` search over a fixed matrix of ``n_items`` item vectors (row ``i`` = item ``i``).

    What a new backend implements. ``isinstance`` checks only that the three names exist, not
    their signatures. The ann source maps rows to item ids and applies the exclusions, so an
    index never sees an id.
    """

    @property
    def n_items(self) -> int:
        """Rows in the index, one per item vector it was built from: every row a search
        returns is below it."""
        ...

    def search(
        self, query: npt.NDArray[np.float32], k: int, deadline: Deadline | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """The best rows for ``query`` and their scores, best first.

        ``query`` is one float32 vector of the index's dimension (a unit vector when the
        metric is ``angular``). Returns at most ``k`` distinct int64 rows (fewer when the
        backend finds fewer) and float32 scores on the ann source's scale, higher is better:
        cosine for ``angular``, inner product for ``dot``, minus the distance for
        ``euclidean``, so results compare across backends. ``deadline`` (None: no hurry) may
        only make the search cheaper (see :func:`scaled_to_deadline`), never make it raise.
        Safe to call from several threads at once: a source's lane serves several requests.
        """
        ...

    def close(self) -> None:
        """Release the index's memory and files. No search may follow it, so it is called only
        once no call is in flight (the retriever leaves a source with a hung call open)."""
        ...


def unit_rows(x: npt.ArrayLike, dtype: type[np.floating[Any]] = np.float32) -> npt.NDArray[Any]:
    """``x`` (one vector or rows of them) scaled to unit length, as ``dtype``; zero vectors stay
    zero. The one normalisation: items, queries, calibration queries and history means."""
    x = np.asarray(x)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(dtype, copy=False)


def scaled_to_deadline(full: int, deadline: Deadline | None, floor: int) -> int:
    """``full``, or when less than ``TIGHT_MS`` is left that much less in proportion (at least
    ``floor``): a search knob (nodes or lists visited) turned down to fit the time left."""
    if deadline is None:
        return full
    left = deadline.remaining_ms()
    if left >= TIGHT_MS:
        return full
    return max(floor, int(full * max(left, 0.0) / TIGHT_MS))
