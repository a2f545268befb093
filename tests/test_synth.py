"""The synthetic log: deterministic, and with the structure the sources are meant to find."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from retrieval.offline.events import read_events
from retrieval.tools.synth import EVENT_TYPES, SynthStats, synthesize

N_ITEMS, N_USERS, N_EVENTS = 4_000, 1_500, 60_000


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthStats:
    out = tmp_path_factory.mktemp("synth") / "events.parquet"
    return synthesize(out, N_ITEMS, N_USERS, N_EVENTS, seed=3, chunk_events=25_000)


def by_session(stats: SynthStats) -> dict[str, np.ndarray]:
    t = pq.read_table(stats.events_path)
    cols = {name: t.column(name).to_numpy() for name in ("session_id", "timestamp", "item_id")}
    cols["category"] = np.asarray(t.column("category").cast("string").to_pylist())
    order = np.lexsort((cols["timestamp"], cols["session_id"]))
    return {k: v[order] for k, v in cols.items()}


def test_files_and_counts(synth: SynthStats) -> None:
    t = pq.read_table(synth.events_path)
    assert t.num_rows == N_EVENTS == synth.n_events  # exact, although chunks do not divide it
    assert t.column_names == [
        "user_id",
        "item_id",
        "timestamp",
        "event_type",
        "session_id",
        "country",
        "category",
    ]
    assert synth.items_path.name == "events.items.parquet"
    items = pq.read_table(synth.items_path)
    assert items.column_names == ["item_id", "category", "country", "first_seen"]
    assert items.num_rows == N_ITEMS
    emb = np.load(synth.embeddings_path, allow_pickle=False)
    ids = np.load(synth.embedding_ids_path, allow_pickle=False)
    assert emb.shape == (N_ITEMS, 32) and emb.dtype == np.float32 and ids.dtype == np.int64
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(ids, items.column("item_id").to_numpy())
    assert synth.n_clusters >= 8 and synth.n_sessions > N_EVENTS / 20


def test_deterministic_for_a_seed(synth: SynthStats, tmp_path: Path) -> None:
    again = synthesize(
        tmp_path / "events.parquet", N_ITEMS, N_USERS, N_EVENTS, seed=3, chunk_events=25_000
    )
    assert pq.read_table(again.events_path).equals(pq.read_table(synth.events_path))
    assert pq.read_table(again.items_path).equals(pq.read_table(synth.items_path))
    assert again.embeddings_path.read_bytes() == synth.embeddings_path.read_bytes()
    other = synthesize(tmp_path / "other.parquet", N_ITEMS, N_USERS, 5_000, seed=4)
    assert not np.array_equal(
        pq.read_table(other.events_path).column("item_id").to_numpy()[:100],
        pq.read_table(synth.events_path).column("item_id").to_numpy()[:100],
    )


def test_funnel_and_popularity(synth: SynthStats) -> None:
    log = read_events(synth.events_path, segments=["country", "category"])
    assert log.event_types is not None and set(log.event_type_names) == set(EVENT_TYPES)
    share = np.bincount(log.event_types, minlength=3) / len(log)
    got = dict(zip(log.event_type_names, share, strict=True))
    assert got["click"] == pytest.approx(0.85, abs=0.02)
    assert got["cart"] == pytest.approx(0.10, abs=0.02)
    assert got["order"] == pytest.approx(0.05, abs=0.02)
    counts = np.sort(np.bincount(log.items))[::-1]
    assert counts[: len(counts) // 100].sum() > 0.10 * len(log)  # a head: top 1% > 10% of events
    assert set(log.segment_values["country"]) <= {
        "US",
        "GB",
        "DE",
        "FR",
        "BR",
        "IN",
        "JP",
        "ES",
        "IT",
        "NL",
    }
    assert len(log.segment_values["category"]) > 1


def test_sessions_are_coherent_and_revisit(synth: SynthStats) -> None:
    ev = by_session(synth)
    nxt = ev["session_id"][1:] == ev["session_id"][:-1]
    same_cat = (ev["category"][1:] == ev["category"][:-1])[nxt].mean()
    _, cat_counts = np.unique(ev["category"], return_counts=True)
    chance = ((cat_counts / cat_counts.sum()) ** 2).sum()
    assert same_cat > 0.8 and same_cat > 2 * chance

    emb = np.load(synth.embeddings_path)
    idx = ev["item_id"] - np.load(synth.embedding_ids_path)[0]
    consecutive = (emb[idx[:-1]] * emb[idx[1:]]).sum(axis=1)[nxt].mean()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, N_ITEMS, (2, 5000))
    random_pairs = (emb[a] * emb[b]).sum(axis=1).mean()
    assert consecutive > 0.5 and random_pairs < 0.2

    # re-visits: the share of next items already seen earlier in the same session
    key = (ev["session_id"] - ev["session_id"].min()) * (ev["item_id"].max() + 1) + ev["item_id"]
    _, first = np.unique(key, return_index=True)
    seen = np.ones(key.shape[0], dtype=bool)
    seen[first] = False
    assert 0.2 <= seen[1:][nxt].mean() <= 0.45

    lengths = np.unique(ev["session_id"], return_counts=True)[1]
    assert lengths.max() <= 20 and 3 <= lengths.mean() <= 8


def test_events_only_reference_released_items(synth: SynthStats) -> None:
    t = pq.read_table(synth.events_path, columns=["item_id", "timestamp"])
    items = pq.read_table(synth.items_path)
    first_seen = items.column("first_seen").to_numpy()
    pos = np.searchsorted(items.column("item_id").to_numpy(), t.column("item_id").to_numpy())
    assert np.all(first_seen[pos] <= t.column("timestamp").to_numpy())
    start = t.column("timestamp").to_numpy().min()
    assert (first_seen > start).mean() > 0.2  # and new items do arrive during the log


def test_csv_and_extension_check(tmp_path: Path) -> None:
    stats = synthesize(
        tmp_path / "ev.csv.gz", 500, 100, 3_000, seed=1, fmt="csv", chunk_events=1_000
    )
    log = read_events(stats.events_path, segments=["country", "category"])
    assert len(log) == 3_000 and log.sessions is not None
    assert (tmp_path / "ev.items.parquet").exists()
    with pytest.raises(ValueError, match="extension"):
        synthesize(tmp_path / "ev.parquet", 10, 10, 10, fmt="csv")
    with pytest.raises(ValueError, match=">= 1"):
        synthesize(tmp_path / "ev.parquet", 0, 10, 10)
