"""The annoy backend of the ann source: random-projection trees, only when asked for.

annoy cannot reach recall 0.95 at k = 1,000 over millions of items within the budget (issue 6),
and where it was measured against exact search it had far lower recall at little more speed
(issue 10; benchmarks/README.md), so ``backend: auto`` never picks it. It segfaults on a wrong
dimension or a damaged file: ``check_sidecar`` validates the sidecar against the index file
before annoy opens it, and ``AnnoySearch`` runs one self-check query after loading.

``AnnoySearch`` is a ``sources.vector_index.VectorIndex``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from annoy import AnnoyIndex

from retrieval.artifacts import ArtifactError
from retrieval.types import Deadline
from sources.vector_index import SELF_CHECK_TOL, scaled_to_deadline, unit_rows

__all__ = ["INDEX", "AnnoySearch", "annoy_metric", "build_annoy", "check_sidecar", "node_bytes"]

INDEX = "index.ann"
_ON_DISK_AUTO = 1_000_000  # items above which the index is built on disk, not in RAM
_ADD_CHUNK = 65_536  # rows converted to Python lists at a time while filling the index


def annoy_metric(metric: str) -> str:
    """angular is served as euclidean over unit vectors: the same ranking (|a-b|^2 = 2 - 2 cos),
    but annoy's euclidean splits have an offset, so they can cut a narrow cone of vectors.

    ALS puts most long-tail items in such a cone (as on the synthetic log); annoy's angular
    splits pass through the origin, fail there and fall back to random sides: its recall against
    exact search collapsed with angular and recovered with this (benchmarks/README.md).
    """
    return "euclidean" if metric == "angular" else metric


def node_bytes(metric: str, dims: int) -> int:
    """annoy's node size: n_descendants + 2 children (+ a float for euclidean/dot) + vector."""
    return 4 + 8 + (0 if metric == "angular" else 4) + 4 * dims


def build_annoy(
    x: npt.NDArray[np.float32],
    metric: str,
    path: Path,
    *,
    n_trees: int,
    seed: int,
    on_disk_build: bool | None = None,
) -> tuple[dict[str, Any], bool]:
    """Fill, build and write the index; return what the sidecar records about it and whether
    it was built on disk (``on_disk_build`` None: above ``_ON_DISK_AUTO`` items)."""
    n, dims = x.shape
    on_disk = on_disk_build if on_disk_build is not None else n > _ON_DISK_AUTO
    index = AnnoyIndex(dims, annoy_metric(metric))  # type: ignore[arg-type]
    index.set_seed(seed)
    if on_disk:
        index.on_disk_build(str(path))
    # annoy has no batch add; one call per item is its API (chunked so lists stay small).
    for start in range(0, n, _ADD_CHUNK):
        chunk = x[start : start + _ADD_CHUNK]
        if metric == "angular":
            chunk = unit_rows(chunk)
        for i, row in enumerate(chunk.tolist(), start):
            index.add_item(i, row)
    index.build(n_trees, n_jobs=-1)
    if not on_disk:
        index.save(str(path))
    index.unload()
    meta = {
        "annoy_metric": annoy_metric(metric),
        "n_trees": n_trees,
        "annoy_version": importlib.metadata.version("annoy"),
        "index_bytes": path.stat().st_size,
    }
    return meta, on_disk


def check_sidecar(meta: Mapping[str, Any], directory: Path, sidecar: Path) -> None:
    """Everything annoy would crash on, checked before annoy sees the file."""
    metric, dims, n = meta["metric"], meta["dims"], meta["n_items"]
    if meta.get("annoy_metric") != annoy_metric(metric):
        raise ArtifactError(
            f"{sidecar}: annoy_metric {meta.get('annoy_metric')!r} does not serve {metric!r}"
        )
    for key in ("max_timestamp", "index_bytes", "own_ids", "user_factors"):
        if key not in meta:
            raise ArtifactError(f"{sidecar}: missing {key!r}; rebuild")
    index = directory / INDEX
    try:
        size = index.stat().st_size
    except OSError as exc:
        raise ArtifactError(f"{index}: missing ({exc}); rebuild") from exc
    node = node_bytes(meta["annoy_metric"], dims)
    if size == 0 or size != meta["index_bytes"] or size % node or size // node < n:
        raise ArtifactError(
            f"{index}: {size} bytes, inconsistent with {sidecar.name} (expected "
            f"{meta['index_bytes']} bytes of {node}-byte nodes for {n} items of {dims} dims); "
            "the file is damaged or from another build"
        )


class AnnoySearch:
    """A loaded annoy index over ``items`` (the build's item vectors, memory-mapped).

    ``meta`` is the sidecar, already checked by ``check_sidecar``. ``search_k`` (nodes visited
    per query; <= 0: ``n_trees`` x the results asked for) shrinks when the deadline is close.
    annoy's searches only read the memory-mapped file: ``search`` is thread-safe.
    """

    def __init__(
        self,
        path: Path,
        meta: Mapping[str, Any],
        items: npt.NDArray[Any],
        *,
        n_trees: int,
        search_k: int = -1,
    ) -> None:
        self.path = path
        self.metric: str = meta["metric"]
        self.n_items = int(meta["n_items"])
        self.n_trees = n_trees
        self.search_k = search_k
        self.index = AnnoyIndex(int(meta["dims"]), meta["annoy_metric"])
        try:
            self.index.load(str(path), prefault=False)
        except OSError as exc:
            raise ArtifactError(f"{path}: annoy cannot load it ({exc})") from exc
        self._self_check(items)

    def _self_check(self, items: npt.NDArray[Any]) -> None:
        """The index must hold the saved vectors and find item 0 (or a near twin) from its vector.

        Near-duplicate vectors (common for long-tail ALS items) cannot be split by a hyperplane,
        so annoy places them on random sides and item 0 itself may be unreachable; a result at
        (almost) zero distance proves the search works just as well.
        """
        v = np.asarray(items[0], dtype=np.float32)
        if self.metric == "angular":
            v = unit_rows(v)
        stored = np.asarray(self.index.get_item_vector(0), dtype=np.float32)
        ok = self.index.get_n_items() == self.n_items and np.allclose(stored, v, atol=1e-5)
        if ok and self.metric != "dot":  # under dot another item may legitimately beat item 0
            found, dist = self.index.get_nns_by_vector(
                v.tolist(), 10, search_k=self.n_trees * 1000, include_distances=True
            )
            scale = float(np.linalg.norm(v)) + 1e-12
            ok = 0 in found or (bool(dist) and dist[0] <= SELF_CHECK_TOL * scale)
        if not ok:
            raise ArtifactError(
                f"{self.path}: self-check failed (item 0 not found from its own vector); "
                "the index does not match item_factors.npy: rebuild"
            )

    def nodes(self, k: int, deadline: Deadline | None = None) -> int:
        """annoy's ``search_k`` for ``k`` results, shrunk in proportion when the deadline is
        close (never below ``k``)."""
        full = self.search_k if self.search_k > 0 else self.n_trees * k
        return scaled_to_deadline(full, deadline, floor=k)

    def search(
        self, query: npt.NDArray[np.float32], k: int, deadline: Deadline | None = None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Rows and scores on the source's scale: annoy's distances converted (cosine from the
        euclidean distance between unit vectors, the dot product as is, -distance)."""
        found, dist = self.index.get_nns_by_vector(
            query.tolist(), k, search_k=self.nodes(k, deadline), include_distances=True
        )
        rows = np.asarray(found, dtype=np.int64)
        d = np.asarray(dist, dtype=np.float32)
        if self.metric == "angular":
            scores = 1.0 - 0.5 * d * d  # unit vectors: |a - b| = sqrt(2 - 2 cos)
        elif self.metric == "dot":
            scores = d
        else:
            scores = -d
        return rows, scores

    def close(self) -> None:
        """Unmap the index file (annoy's ``unload``); no search may follow."""
        self.index.unload()
