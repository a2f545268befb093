"""A source of your own, blended with the built-in ones: no change to the package needed.

    python examples/custom_source.py       # run examples/quickstart.py first (it builds)

The YAML references the class by import path (``kind: custom_source:EditorsPicks``); its
``params`` are validated against its own ``Params`` model when the config loads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from pydantic import Field

from retrieval import CandidateSet, Deadline, Request, Retriever, Source, SourceParams, load_config

HERE = Path(__file__).resolve().parent


class EditorsPicks(Source):
    """Hand-picked items, optionally per country: the kind of source every team ends up adding."""

    class Params(SourceParams):
        items: list[int] = Field(default_factory=list)
        by_country: dict[str, list[int]] = Field(default_factory=dict)

    def retrieve(
        self, request: Request, k: int, deadline: Deadline
    ) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(self.params, EditorsPicks.Params)
        country = request.context.get("country", "")
        picks = self.params.by_country.get(country) or self.params.items
        ids = np.asarray(picks[:k], dtype=np.int64)
        return ids, np.linspace(1.0, 0.5, ids.size, dtype=np.float32)


EXTRA = """
  - name: editors
    kind: custom_source:EditorsPicks
    weight: 2.0
    params:
      items: [1000001, 1000002, 1000003]
      by_country: {DE: [1000010, 1000011]}
"""


def main(artifacts: Path | None = None) -> CandidateSet:
    sys.path.insert(0, str(HERE))  # so that `custom_source:EditorsPicks` imports
    base = load_config(HERE / "config.yaml")
    artifacts = artifacts or base.resolve_path(base.artifacts or "artifacts")
    text = (HERE / "config.yaml").read_text() + EXTRA
    text = text.replace("artifacts: ../artifacts/quickstart", f"artifacts: {artifacts}")
    config_path = artifacts.parent / "custom.yaml"
    config_path.write_text(text)
    with Retriever.from_yaml(config_path) as retriever:
        result = retriever.blend(user_id="new-user", history=[], context={"country": "DE"}, k=20)
    print(f"{len(result)} candidates; editors' picks at ranks:", end=" ")
    mask = result.from_source("editors")
    print(np.flatnonzero(mask).tolist(), "items", result.item_ids[mask].tolist())
    for r in result.reports:
        print(f"  {r.name:<8} {r.status.value:<8} returned {r.returned:>4}  kept {r.survived:>4}")
    return result


if __name__ == "__main__":
    main()
