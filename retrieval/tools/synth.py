"""A synthetic event log with the structure real logs have, at any scale, in bounded memory.

Every source needs data that rewards it for the right reason: co-visitation needs sessions whose
consecutive items are related, item-CF needs users with stable tastes, ANN needs embeddings that
agree with behaviour, popularity needs a long tail that differs by segment, and "new items" need
releases over time. Uniform random events would make every source look equally useless.

Generation is vectorised per chunk: a chunk is a slice of time, its sessions are rows of a matrix
and one loop over the (at most 20) steps of a session advances all sessions at once.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from tqdm import tqdm

from retrieval.errors import InputError
from sources.vector_index import unit_rows

__all__ = ["EVENT_TYPES", "SynthStats", "synthesize"]

T0 = 1_704_067_200.0  # 2024-01-01T00:00:00Z: the log starts here
SPAN = 90 * 86_400.0  # and covers 90 days
ITEM_ID_BASE = 1_000_000
USER_ID_BASE = 10_000_000_000
SESSION_ID_BASE = 90_000_000_000
EMB_DIM = 32
MAX_SESSION = 20
EVENT_TYPES = ("click", "cart", "order")
FUNNEL = (0.85, 0.10, 0.05)
COUNTRIES = ("US", "GB", "DE", "FR", "BR", "IN", "JP", "ES", "IT", "NL")
_COUNTRY_P = 1.0 / np.arange(1, len(COUNTRIES) + 1) ** 0.9
_COUNTRY_P /= _COUNTRY_P.sum()

# What the next event of a session does (probabilities of a categorical draw).
_P_REVISIT_SESSION = 0.18  # an item seen earlier in this session
_P_REVISIT_USER = 0.07  # the user's long-standing favourite in the current cluster
_P_NEIGHBOUR = 0.45  # a near neighbour of the previous item in the cluster's ordering
_P_JUMP = 0.22  # a fresh popularity draw in the same cluster
# remainder (0.08): switch to another of the user's clusters

_ZIPF_ITEMS = 1.1  # popularity exponent of items within a cluster
_ZIPF_CLUSTERS = 0.9  # and of clusters
_INITIAL_FRACTION = 0.6  # share of the catalogue released before the log starts


@dataclass(frozen=True)
class SynthStats:
    """What was written, for the CLI to print and tests to check."""

    events_path: Path
    items_path: Path
    embeddings_path: Path
    embedding_ids_path: Path
    n_events: int
    n_users: int
    n_active_users: int
    n_items: int
    n_sessions: int
    n_clusters: int
    seconds: float


@dataclass(frozen=True)
class _World:
    """Items laid out per cluster in popularity order, and users with drifting tastes.

    Items live at "positions": cluster ``c`` owns positions ``start[c]:start[c+1]``, ordered by
    popularity, and neighbouring positions are related items (what a session browses through).
    ``pos_item`` hides that layout behind shuffled item indices.
    """

    start: npt.NDArray[np.int64]
    size: npt.NDArray[np.int64]
    pos_cluster: npt.NDArray[np.int32]
    pos_item: npt.NDArray[np.int64]
    pos_release: npt.NDArray[np.float64]
    cluster_cdf: npt.NDArray[np.float64]
    cluster_category: npt.NDArray[np.int16]
    categories: tuple[str, ...]
    item_country: npt.NDArray[np.int8]
    user_cdf: npt.NDArray[np.float64]
    user_country: npt.NDArray[np.int8]
    n_fav: npt.NDArray[np.int8]
    fav_before: npt.NDArray[np.int32]
    fav_after: npt.NDArray[np.int32]
    fav_switch: npt.NDArray[np.float64]

    @property
    def n_clusters(self) -> int:
        return int(self.size.shape[0])


def synthesize(
    out: Path,
    n_items: int,
    n_users: int,
    n_events: int,
    seed: int = 0,
    fmt: Literal["parquet", "csv"] = "parquet",
    chunk_events: int = 2_000_000,
    progress: bool = False,
) -> SynthStats:
    """Write ``out`` (the events) plus ``<stem>.items.parquet``, ``<stem>.embeddings.npy`` and
    ``<stem>.embedding_ids.npy`` beside it. Same arguments, same output: every random draw comes
    from ``seed`` through per-chunk child seeds.
    """
    began = time.perf_counter()
    out = Path(out)
    if min(n_items, n_users, n_events, chunk_events) < 1:
        raise InputError("n_items, n_users, n_events and chunk_events must all be >= 1")
    _check_format(out, fmt)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = _stem(out)
    items_path = out.parent / f"{stem}.items.parquet"
    emb_path = out.parent / f"{stem}.embeddings.npy"
    emb_ids_path = out.parent / f"{stem}.embedding_ids.npy"

    n_chunks = math.ceil(n_events / chunk_events)
    seeds = np.random.SeedSequence(seed).spawn(3 + n_chunks)
    world = _make_world(np.random.default_rng(seeds[0]), n_items, n_users)
    _write_items(items_path, world)
    _write_embeddings(emb_path, emb_ids_path, world, seeds[1])

    active = np.zeros(n_users, dtype=bool)
    n_sessions = 0
    writer = _EventWriter(out, fmt, _event_schema(world))
    bar = tqdm(
        total=n_events, unit="ev", unit_scale=True, disable=not (progress and sys.stderr.isatty())
    )
    try:
        for k in range(n_chunks):
            m = min(chunk_events, n_events - k * chunk_events)
            lo = T0 + SPAN * k / n_chunks
            rng = np.random.default_rng(seeds[3 + k])
            table, users, sessions = _chunk(rng, world, m, lo, SPAN / n_chunks, n_sessions)
            writer.write(table)
            active[users] = True
            n_sessions += sessions
            bar.update(m)
    finally:
        bar.close()
        writer.close()
    return SynthStats(
        events_path=out,
        items_path=items_path,
        embeddings_path=emb_path,
        embedding_ids_path=emb_ids_path,
        n_events=n_events,
        n_users=n_users,
        n_active_users=int(active.sum()),
        n_items=n_items,
        n_sessions=n_sessions,
        n_clusters=world.n_clusters,
        seconds=time.perf_counter() - began,
    )


def _check_format(out: Path, fmt: str) -> None:
    name = out.name.lower()
    if fmt == "parquet":
        ok = name.endswith((".parquet", ".pq"))
    elif fmt == "csv":
        ok = name.endswith((".csv", ".csv.gz"))
    else:
        raise InputError(f"fmt must be 'parquet' or 'csv', got {fmt!r}")
    if not ok:
        raise InputError(f"{out}: the extension does not match fmt={fmt!r}; readers go by it")


def _stem(out: Path) -> str:
    name = out.name
    for suffix in (".csv.gz", ".csv", ".parquet", ".pq"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return out.stem


# --------------------------------------------------------------------------------------------
# the world: catalogue and users


def _zipf_cdf(rng: np.random.Generator, n: int, exponent: float) -> npt.NDArray[np.float64]:
    """CDF of a power law over ``n`` outcomes whose ranks are shuffled (so id != rank)."""
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    w = w[rng.permutation(n)]
    cdf = np.cumsum(w)
    return cdf / cdf[-1]


def _draw(rng: np.random.Generator, cdf: npt.NDArray[np.float64], n: int) -> npt.NDArray[np.int64]:
    """``n`` draws from a discrete distribution given by its CDF (one binary search each)."""
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(idx, cdf.shape[0] - 1).astype(np.int64)


def _make_world(rng: np.random.Generator, n_items: int, n_users: int) -> _World:
    n_clusters = int(min(n_items, max(8, min(4096, round(math.sqrt(n_items) / 4)))))
    # Cluster sizes vary (lognormal), every cluster holds at least one item.
    share = rng.lognormal(0.0, 0.6, n_clusters)
    size = 1 + rng.multinomial(n_items - n_clusters, share / share.sum()).astype(np.int64)
    start = np.zeros(n_clusters + 1, dtype=np.int64)
    np.cumsum(size, out=start[1:])
    pos_cluster = np.repeat(np.arange(n_clusters, dtype=np.int32), size)

    # Release dates: most of the catalogue predates the log, the rest arrives during it. The
    # head of each cluster is always old, so there is always something released to fall back on.
    initial = rng.random(n_items) < _INITIAL_FRACTION
    initial[start[:-1]] = True
    pos_release: npt.NDArray[np.float64] = np.where(
        initial, T0 - rng.random(n_items) * 365 * 86_400.0, T0 + rng.random(n_items) * SPAN
    )
    pos_release = np.round(pos_release, 3).astype(np.float64)

    n_categories = int(min(500, max(4, n_clusters // 4)))
    width = len(str(n_categories - 1))
    categories = tuple(f"cat_{i:0{width}d}" for i in range(n_categories))
    cluster_category = rng.integers(0, n_categories, n_clusters).astype(np.int16)
    item_country = _draw(rng, np.cumsum(_COUNTRY_P), n_items).astype(np.int8)

    # Users: power-law activity, a country, 1-3 favourite clusters that each switch once at a
    # random time (often after the log ends), so tastes drift slowly. Each country prefers its
    # own mix of clusters, which gives segmented popularity something to find.
    user_cdf = _zipf_cdf(rng, n_users, 0.8)
    user_country = _draw(rng, np.cumsum(_COUNTRY_P), n_users).astype(np.int8)
    n_fav = rng.choice(np.array([1, 2, 3], dtype=np.int8), n_users, p=[0.4, 0.35, 0.25])
    global_w = np.diff(_zipf_cdf(rng, n_clusters, _ZIPF_CLUSTERS), prepend=0.0)
    cluster_cdf = np.cumsum(global_w)
    fav_before = np.empty((n_users, 3), dtype=np.int32)
    fav_after = np.empty((n_users, 3), dtype=np.int32)
    for country in range(len(COUNTRIES)):
        rows = np.flatnonzero(user_country == country)
        local_cdf = np.cumsum(0.5 * global_w + 0.5 * global_w[rng.permutation(n_clusters)])
        local_cdf /= local_cdf[-1]
        fav_before[rows] = _draw(rng, local_cdf, rows.size * 3).reshape(-1, 3)
        fav_after[rows] = _draw(rng, local_cdf, rows.size * 3).reshape(-1, 3)
    fav_switch = T0 + rng.random((n_users, 3)) * 3 * SPAN

    return _World(
        start=start,
        size=size,
        pos_cluster=pos_cluster,
        pos_item=rng.permutation(n_items).astype(np.int64),
        pos_release=pos_release,
        cluster_cdf=cluster_cdf / cluster_cdf[-1],
        cluster_category=cluster_category,
        categories=categories,
        item_country=item_country,
        user_cdf=user_cdf,
        user_country=user_country,
        n_fav=n_fav,
        fav_before=fav_before,
        fav_after=fav_after,
        fav_switch=fav_switch,
    )


def _item_positions(world: _World) -> npt.NDArray[np.int64]:
    item_pos = np.empty_like(world.pos_item)
    item_pos[world.pos_item] = np.arange(world.pos_item.shape[0], dtype=np.int64)
    return item_pos


def _write_items(path: Path, world: _World) -> None:
    item_pos = _item_positions(world)
    cluster = world.pos_cluster[item_pos]
    n = item_pos.shape[0]
    table = pa.table(
        {
            "item_id": pa.array(ITEM_ID_BASE + np.arange(n, dtype=np.int64)),
            "category": _dict(world.cluster_category[cluster], world.categories),
            "country": _dict(world.item_country, COUNTRIES),
            "first_seen": pa.array(world.pos_release[item_pos]),
        }
    )
    pq.write_table(table, path, row_group_size=1_000_000)


def _write_embeddings(
    path: Path, ids_path: Path, world: _World, seed: np.random.SeedSequence, chunk: int = 500_000
) -> None:
    """Unit vectors a two-tower model would give: cluster centroid + a smooth drift along the
    cluster's ordering (so neighbours are closer than strangers) + noise. Streamed to disk."""
    rng = np.random.default_rng(seed)
    n_items, k = world.pos_item.shape[0], world.n_clusters

    def unit(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return unit_rows(x, dtype=np.float64)

    centroid = unit(rng.standard_normal((k, EMB_DIM)))
    axis_a = unit(rng.standard_normal((k, EMB_DIM)))
    axis_b = unit(rng.standard_normal((k, EMB_DIM)))
    item_pos = _item_positions(world)
    emb = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_items, EMB_DIM))
    for lo in range(0, n_items, chunk):
        pos = item_pos[lo : lo + chunk]
        c = world.pos_cluster[pos]
        rank = pos - world.start[c]
        theta = (np.pi * rank / np.maximum(world.size[c], 2))[:, None]
        noise = rng.standard_normal((pos.shape[0], EMB_DIM)) * (0.6 / math.sqrt(EMB_DIM))
        v = centroid[c] + 0.4 * (np.cos(theta) * axis_a[c] + np.sin(theta) * axis_b[c]) + noise
        emb[lo : lo + chunk] = unit(v)
    emb.flush()
    del emb
    np.save(ids_path, ITEM_ID_BASE + np.arange(n_items, dtype=np.int64), allow_pickle=False)


# --------------------------------------------------------------------------------------------
# events


def _zipf_in_cluster(
    rng: np.random.Generator, world: _World, cluster: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """A popularity draw inside each given cluster (bounded power law by inverse CDF)."""
    size = world.size[cluster].astype(np.float64)
    a = 1.0 - _ZIPF_ITEMS
    x = (1.0 - rng.random(cluster.shape[0]) * (1.0 - (size + 1.0) ** a)) ** (1.0 / a)
    rank = np.minimum(x.astype(np.int64) - 1, world.size[cluster] - 1)
    return world.start[cluster] + np.maximum(rank, 0)


def _favourite(
    rng: np.random.Generator,
    world: _World,
    users: npt.NDArray[np.int64],
    t: npt.NDArray[np.float64],
) -> npt.NDArray[np.int64]:
    """One of each user's favourite clusters at time ``t`` (10% of the time: exploration)."""
    slot = (rng.random(users.shape[0]) * world.n_fav[users]).astype(np.int64)
    switched = t >= world.fav_switch[users, slot]
    fav = np.where(switched, world.fav_after[users, slot], world.fav_before[users, slot])
    explore: npt.NDArray[np.bool_] = np.less(rng.random(users.shape[0]), 0.10)
    if explore.any():
        fav[explore] = _draw(rng, world.cluster_cdf, int(explore.sum()))
    return fav.astype(np.int64)


def _user_favourite_item(
    world: _World, users: npt.NDArray[np.int64], cluster: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """A stable per-(user, cluster) item among the cluster's top 30: cross-session re-visits."""
    with np.errstate(over="ignore"):
        h = users.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= cluster.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
    frac = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    top = np.minimum(world.size[cluster], 30)
    return world.start[cluster] + (top * frac**2).astype(np.int64)


def _released(
    rng: np.random.Generator,
    world: _World,
    pos: npt.NDArray[np.int64],
    t: npt.NDArray[np.float64],
) -> npt.NDArray[np.int64]:
    """Replace items not yet released at ``t``: redraw in the same cluster, else its head."""
    for _ in range(3):
        bad = np.flatnonzero(world.pos_release[pos] > t)
        if bad.size == 0:
            return pos
        pos[bad] = _zipf_in_cluster(rng, world, world.pos_cluster[pos[bad]].astype(np.int64))
    bad = np.flatnonzero(world.pos_release[pos] > t)
    pos[bad] = world.start[world.pos_cluster[pos[bad]]]
    return pos


def _session_lengths(rng: np.random.Generator, m: int) -> npt.NDArray[np.int64]:
    """Lengths of 2..20 (mean ~5.5) summing to exactly ``m`` (the last one is cut)."""
    lengths = np.empty(0, dtype=np.int64)
    while lengths.sum() < m:
        more = np.minimum(MAX_SESSION, 1 + rng.geometric(0.22, m // 4 + 1)).astype(np.int64)
        lengths = np.concatenate([lengths, more])
    cum = np.cumsum(lengths)
    n = int(np.searchsorted(cum, m)) + 1
    lengths = lengths[:n]
    lengths[-1] -= int(cum[n - 1]) - m
    return lengths


def _chunk(
    rng: np.random.Generator,
    world: _World,
    m: int,
    t_lo: float,
    t_len: float,
    session_base: int,
) -> tuple[pa.Table, npt.NDArray[np.int64], int]:
    """``m`` events of sessions starting in ``[t_lo, t_lo + t_len)``, sorted by time."""
    lengths = _session_lengths(rng, m)
    s = lengths.shape[0]
    users = _draw(rng, world.user_cdf, s)
    steps = int(lengths.max())
    gaps = 5.0 + rng.exponential(40.0, (s, steps))
    gaps[:, 0] = t_lo + rng.random(s) * t_len
    ts = np.cumsum(gaps, axis=1)

    pos = np.zeros((s, steps), dtype=np.int64)
    cluster = _favourite(rng, world, users, ts[:, 0])
    pos[:, 0] = _released(rng, world, _zipf_in_cluster(rng, world, cluster), ts[:, 0])
    cuts = np.cumsum([_P_REVISIT_SESSION, _P_REVISIT_USER, _P_NEIGHBOUR, _P_JUMP])
    for j in range(1, steps):
        rows = np.flatnonzero(lengths > j)
        action = np.searchsorted(cuts, rng.random(rows.size), side="right")
        prev = pos[rows, j - 1]
        c = world.pos_cluster[prev].astype(np.int64)
        nxt = _zipf_in_cluster(rng, world, c)  # action 3 (jump), the default
        # 0: re-visit an earlier item of this session
        a = action == 0
        back = (rng.random(int(a.sum())) * j).astype(np.int64)
        nxt[a] = pos[rows[a], back]
        # 1: the user's favourite item of this cluster, seen across their sessions
        a = action == 1
        nxt[a] = _user_favourite_item(world, users[rows[a]], c[a])
        # 2: a near neighbour in the cluster's ordering (mostly the very next or previous one)
        a = action == 2
        step = rng.choice(np.array([-3, -2, -1, 1, 2, 3]), int(a.sum()), p=_NEIGHBOUR_P)
        lo, hi = world.start[c[a]], world.start[c[a] + 1] - 1
        nxt[a] = np.clip(prev[a] + step, lo, hi)
        # 4: move to another of the user's clusters
        a = action == 4
        nxt[a] = _zipf_in_cluster(
            rng, world, _favourite(rng, world, users[rows[a]], ts[rows[a], j])
        )
        fresh = action != 0  # earlier items of the session are released already
        nxt[fresh] = _released(rng, world, nxt[fresh], ts[rows[fresh], j])
        pos[rows, j] = nxt

    valid = np.arange(steps)[None, :] < lengths[:, None]
    ev_pos = pos[valid]
    ev_ts = np.round(ts[valid], 3)
    ev_user = np.repeat(users, lengths)
    ev_session = SESSION_ID_BASE + session_base + np.repeat(np.arange(s, dtype=np.int64), lengths)
    ev_type = _draw(rng, np.cumsum(FUNNEL), m).astype(np.int8)
    order = np.argsort(ev_ts, kind="stable")  # logs arrive in time order, sessions interleaved
    item_idx = world.pos_item[ev_pos]
    cluster_of = world.pos_cluster[ev_pos]
    table = pa.table(
        {
            "user_id": pa.array((USER_ID_BASE + ev_user)[order]),
            "item_id": pa.array((ITEM_ID_BASE + item_idx)[order]),
            "timestamp": pa.array(ev_ts[order]),
            "event_type": _dict(ev_type[order], EVENT_TYPES),
            "session_id": pa.array(ev_session[order]),
            "country": _dict(world.user_country[ev_user][order], COUNTRIES),
            "category": _dict(world.cluster_category[cluster_of][order], world.categories),
        }
    )
    return table, users, s


_NEIGHBOUR_P = np.array([0.1, 0.15, 0.25, 0.25, 0.15, 0.1])


def _dict(codes: npt.NDArray[np.integer], values: tuple[str, ...]) -> pa.DictionaryArray:
    index_type = pa.int8() if len(values) < 128 else pa.int16()
    return pa.DictionaryArray.from_arrays(
        pa.array(codes.astype(index_type.to_pandas_dtype())), pa.array(values, type=pa.string())
    )


def _event_schema(world: _World) -> pa.Schema:
    def dict_type(values: tuple[str, ...]) -> pa.DataType:
        return pa.dictionary(pa.int8() if len(values) < 128 else pa.int16(), pa.string())

    return pa.schema(
        [
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("timestamp", pa.float64()),
            ("event_type", dict_type(EVENT_TYPES)),
            ("session_id", pa.int64()),
            ("country", dict_type(COUNTRIES)),
            ("category", dict_type(world.categories)),
        ]
    )


class _EventWriter:
    """Parquet (one row group per chunk) or CSV (gzip when the name ends in ``.gz``)."""

    def __init__(self, path: Path, fmt: str, schema: pa.Schema) -> None:
        self._parquet: pq.ParquetWriter | None = None
        self._csv: pcsv.CSVWriter | None = None
        self._sink: pa.NativeFile | None = None
        if fmt == "parquet":
            self._parquet = pq.ParquetWriter(path, schema, compression="zstd")
        else:
            plain = pa.schema([f.with_type(_plain(f.type)) for f in schema])
            if path.name.lower().endswith(".gz"):
                self._sink = pa.CompressedOutputStream(str(path), "gzip")
            else:
                self._sink = pa.OSFile(str(path), "wb")
            self._csv = pcsv.CSVWriter(self._sink, plain)

    def write(self, table: pa.Table) -> None:
        if self._parquet is not None:
            self._parquet.write_table(table)
        elif self._csv is not None:
            cols = [c.cast(_plain(c.type)) for c in table.columns]
            self._csv.write_table(pa.table(cols, names=table.column_names))

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._csv is not None:
            self._csv.close()
        if self._sink is not None:
            self._sink.close()


def _plain(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t
