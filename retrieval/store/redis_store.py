"""A Redis store with the behaviour of ``MemoryStore``, shared between processes and hosts.

Key layout (``p`` is the ``prefix``; every key lives under ``{p}:``)::

    {p}:h:{user_id}              list, newest first: one JSON ``[item, ts, event_type]`` per event
                                 (LPUSH + LTRIM to history_len, optional EXPIRE history_ttl_s)
    {p}:pop:e{era}:{segment}     sorted set: member = JSON item id (``42`` or ``"sku-42"``, so the
                                 id type round-trips), score = sum of ``w * 2**((t - t_era)/hl)``;
                                 ``segment`` is ``country=de`` or ``_global`` for ``None``
    {p}:popm:e{era}:{segment}    marker: this era's set has absorbed the previous era's (SET NX)
    {p}:cache:{key}              bytes of a cached blend result (SET PX)
    {p}:nb:current:{source}      the version of ``source``'s pushed lists that readers use
    {p}:nb:{version}:{source}:{item}   one packed row (``retrieval.store.rows``) per item
    {p}:nb:{version}:{source}:   marker (empty item): this version's rows were all written

Decay without rescans: an event adds ``w * 2**((t - t_era) / half_life_s)`` with ZINCRBY, so the
set is always ranked by decayed weight and ``popular()`` scales scores to now with one factor. A
fixed reference time would overflow floats after 1,024 half-lives (42 days at a one-hour
half-life), so time is cut into eras of 64 half-lives measured from the constant ``T0``: every
process derives the same era from the clock, and the first reader or writer of a new era folds
the previous set in (scaled by ``2**-64``) with one atomic script, once per segment per era.
Processes whose clocks disagree by more than a few ms around that instant may split a handful of
events across the two sets. Scripts touch two keys, so this is for one Redis (with replicas), not
Redis Cluster. A user id ``42`` and ``"42"`` share a history key, as ids compare by their text in
``IdMap``.

Failure rules: reads (``fetch``, ``history``, ``popular``, ``cache_get``) never raise and never
block past their budget; on any error (foreign data at our keys included) they return what they
could read and ``status()`` turns ``"degraded"`` with a ``reason``, back to ``"ok"`` on the next
successful round trip (the pool reconnects by itself). ``neighbour_rows`` raises ``StoreError``
instead, so the source reading it reports an error. ``record()`` validates and serialises the
whole batch before sending or buffering any of it (``InputError`` for a bad event). Writes retry
only failures that happened before anything was sent (ZINCRBY is not idempotent, so a batch whose
fate is unknown is never sent twice), then raise ``StoreUnavailable`` or, with ``buffer_events >
0``, keep the events in a bounded buffer that the next ``record()`` or ``flush()`` sends; an
event leaves the buffer only once sent. A write that meets a foreign-typed key (WRONGTYPE) raises
``StoreError``. Passwords never reach logs or messages (``redact``).
"""

from __future__ import annotations

import json
import json.scanner
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any, NamedTuple

import redis
from redis.exceptions import RedisError, ResponseError

from retrieval.errors import InputError, StoreError
from retrieval.redact import redact, secrets_of
from retrieval.store import Event, StoreRead, StoreUnavailable, check_events
from retrieval.store.rows import Row, RowFormatError, unpack_row
from retrieval.types import DEFAULT_EVENT_WEIGHTS, ItemId, UserId

__all__ = ["ERA_HALF_LIVES", "T0", "RedisStore", "StoreRead", "StoreUnavailable", "redact"]

logger = logging.getLogger(__name__)

# The longest history entry or popular member read back: an id and an event type of at most
# MAX_TEXT_CHARS each (checked by record()), JSON-escaped at 6 bytes a character, fit.
MAX_VALUE_BYTES = 16 * 1024
logger.addHandler(logging.NullHandler())

T0 = 1_704_067_200.0  # 2024-01-01T00:00:00Z: the decay reference every process agrees on
ERA_HALF_LIVES = 64  # an era's weights stay within 2**64: far from float overflow
WRITE_BACKOFF_S = (0.005, 0.02, 0.08)  # waits between the tries of a write that was never sent
FLUSH_CHUNK = 1_000  # buffered events per pipeline when flushing
GLOBAL_SEGMENT = "_global"

# KEYS: current set, previous set, marker. ARGV: previous-era factor, marker ttl, old-set ttl.
# The user's newest events, unless the key holds far more bytes than this store ever writes
# there: a foreign value of megabytes must not cross the network inside a request's deadline (the
# reply timeout bounds each socket read, not a transfer that keeps arriving), and copying it
# into Lua to inspect it would stall the server. MEMORY USAGE measures without copying.
_HISTORY = """
local n = tonumber(ARGV[1])
local bytes = redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', 0)
if bytes and bytes > n * tonumber(ARGV[2]) + 65536 then
  return redis.error_reply('history key holds ' .. bytes .. ' bytes, more than this store writes')
end
return redis.call('LRANGE', KEYS[1], 0, n - 1)
"""

_MIGRATE = """
if redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[2]) then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('ZUNIONSTORE', KEYS[1], 2, KEYS[1], KEYS[2], 'WEIGHTS', 1, ARGV[1])
    redis.call('EXPIRE', KEYS[2], ARGV[3])
  end
  return 1
end
return 0
"""


# KEYS: the current-version key. ARGV: row key head, ":{source}:", then the items. Returns the
# version, whether its marker (the row key of the empty item) exists, then one row per item.
# Atomic, so a push switching versions while this runs is seen entirely before or entirely after.
_ROWS = """
local v = redis.call('GET', KEYS[1])
if not v then return {false} end
local head = ARGV[1] .. v .. ARGV[2]
local out = {v, redis.call('EXISTS', head)}
for i = 3, #ARGV, 256 do
  local keys = {}
  for j = i, math.min(i + 255, #ARGV) do keys[#keys + 1] = head .. ARGV[j] end
  local rows = redis.call('MGET', unpack(keys))
  for j = 1, #keys do out[#out + 1] = rows[j] end
end
return out
"""


class _Unsent(Exception):
    """Nothing reached Redis: safe to try again."""


class _Uncertain(Exception):
    """The commands were sent but the replies were lost: they may have run."""


class _Rejected(Exception):
    """Redis ran the batch but refused some commands (foreign data at our keys): the others
    did apply, so it must not be sent again."""


class _Packed(NamedTuple):
    """One event as it will be written: every field already validated and serialised, so a
    buffered event can always be sent (nothing about it can fail later)."""

    history_key: str
    entry: str  # JSON [item, ts, event_type]
    member: str  # JSON item id
    timestamp: float
    weight: float  # the event type's weight
    segments: tuple[str, ...]


# A connection made on behalf of a read honours that read's deadline, not the pool's timeouts.
_budget = threading.local()


def _connect_within_budget(conn: Any, connect: Any) -> None:
    until: float | None = getattr(_budget, "until", None)
    if until is None:
        connect()
        return
    saved = conn.socket_timeout, conn.socket_connect_timeout
    left = max(until - time.monotonic(), 0.001)
    conn.socket_timeout = min(saved[0] or left, left)
    conn.socket_connect_timeout = min(saved[1] or left, left)
    try:
        connect()
    finally:
        conn.socket_timeout, conn.socket_connect_timeout = saved
        conn.update_current_socket_timeout(-1)  # re-arm the live socket with the pool's timeout


class _Connection(redis.Connection):
    def connect(self) -> None:
        _connect_within_budget(self, super().connect)


class _SSLConnection(redis.SSLConnection):
    def connect(self) -> None:
        _connect_within_budget(self, super().connect)


class _UnixConnection(redis.UnixDomainSocketConnection):
    def connect(self) -> None:
        _connect_within_budget(self, super().connect)


class RedisStore:
    """The ``Store`` protocol on Redis, plus a one-round-trip hot-path read and a result cache.

    Thread-safe: one connection pool, created here, serves every thread; each call borrows one
    connection for one round trip.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "cr",
        history_len: int = 200,
        history_ttl_s: float | None = None,
        half_life_s: float = 86_400.0,
        event_weights: Mapping[str, float] | None = None,
        socket_timeout_ms: float = 100.0,
        connect_timeout_ms: float | None = None,
        buffer_events: int = 0,
        health_check_interval_s: int = 1,
    ) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
        if history_len < 0 or buffer_events < 0:
            raise ValueError("history_len and buffer_events must be >= 0")
        if history_ttl_s is not None and not history_ttl_s > 0:
            raise ValueError(f"history_ttl_s must be > 0 or None, got {history_ttl_s}")
        self.url = redact(url)
        self.prefix = prefix
        self.history_len = history_len
        self.history_ttl_s = history_ttl_s
        self.half_life_s = float(half_life_s)
        self.event_weights = dict(DEFAULT_EVENT_WEIGHTS if event_weights is None else event_weights)
        self.socket_timeout_ms = float(socket_timeout_ms)
        self._counts_lock = threading.Lock()  # the counters below are bumped from many threads
        self.dropped = 0  # buffered events lost to overflow
        self.uncertain = 0  # events in batches whose replies were lost (maybe applied, not resent)
        self.rejected = 0  # events of batches Redis partly refused (WRONGTYPE): not resent
        self._failures = 0
        self._secrets = secrets_of(url)
        scheme = url.split("://", 1)[0].lower()
        conn_class = {"rediss": _SSLConnection, "unix": _UnixConnection}.get(scheme, _Connection)
        try:
            self._pool = redis.ConnectionPool.from_url(
                url,
                connection_class=conn_class,
                socket_timeout=socket_timeout_ms / 1000.0,
                socket_connect_timeout=(connect_timeout_ms or socket_timeout_ms) / 1000.0,
                retry=None,  # no retries inside redis-py: writes retry here, reads never do
                health_check_interval=health_check_interval_s,
                driver_info=None,  # no CLIENT SETINFO: two fewer round trips per connect
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"invalid redis url {self.url}: {self._scrub(str(exc))}") from None
        self._buffer: deque[_Packed] = deque(maxlen=buffer_events or None)
        self._buffer_max = buffer_events
        self._buf_lock = threading.Lock()
        self._migrated: set[tuple[int, str]] = set()
        self._failure: str | None = None
        self._closed = False

    # -- keys and decay -------------------------------------------------------------------

    def _history_key(self, user_id: UserId) -> str:
        return f"{self.prefix}:h:{user_id}"

    def _segment_name(self, segment: str | None) -> str:
        return GLOBAL_SEGMENT if segment is None else segment

    def _pop_key(self, era: int, segment: str) -> str:
        return f"{self.prefix}:pop:e{era}:{segment}"

    def _migrate_cmd(self, era: int, segment: str) -> tuple[Any, ...]:
        era_s = self.half_life_s * ERA_HALF_LIVES
        return (
            "EVAL",
            _MIGRATE,
            3,
            self._pop_key(era, segment),
            self._pop_key(era - 1, segment),
            f"{self.prefix}:popm:e{era}:{segment}",
            repr(2.0**-ERA_HALF_LIVES),
            max(1, math.ceil(2 * era_s)),
            max(1, math.ceil(era_s)),
        )

    def _era(self, now: float) -> tuple[int, float]:
        """The era containing ``now`` and its reference time."""
        era_s = self.half_life_s * ERA_HALF_LIVES
        era = math.floor((now - T0) / era_s)
        return era, T0 + era * era_s

    # -- status ---------------------------------------------------------------------------

    def status(self) -> str:
        """``"ok"``, or ``"degraded"`` from a failed or unreadable round trip until the next
        one that succeeds (``reason`` says why). Never raises and makes no round trip itself."""
        return "degraded" if self._failure is not None else "ok"

    @property
    def reason(self) -> str | None:
        """Why the store is degraded (passwords removed), or None when it is ok."""
        return self._failure

    @property
    def buffered(self) -> int:
        """Events waiting in the buffer for Redis (0 unless ``buffer_events > 0``): a growing
        count means writes are failing and, once it reaches ``buffer_events``, the oldest are
        being dropped (``dropped``)."""
        return len(self._buffer)

    @property
    def failures(self) -> int:
        """Failed or unreadable round trips so far (thread-safe): a blend compares it before
        and after to see whether its own reads failed."""
        return self._failures

    def _count(self, name: str, n: int) -> int:
        """Add ``n`` to the counter ``name`` under the lock; the new total."""
        with self._counts_lock:
            total = int(getattr(self, name)) + n
            setattr(self, name, total)
            return total

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _degrade(self, what: str, exc: BaseException | str) -> None:
        detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        reason = self._scrub(f"{what}: {detail}")
        self._count("_failures", 1)
        if self._failure is None:
            logger.warning("redis store %s degraded: %s", self.url, reason)
        self._failure = reason

    def _recover(self) -> None:
        if self._failure is not None:
            logger.info("redis store %s recovered", self.url)
            self._failure = None

    # -- one round trip -------------------------------------------------------------------

    def _roundtrip(self, cmds: Sequence[tuple[Any, ...]], timeout_s: float | None) -> list[Any]:
        """Send ``cmds`` as one pipeline (no MULTI) and read every reply.

        A reply that is a Redis error comes back as a ``ResponseError`` in the list. ``timeout_s``
        bounds the whole call, connecting included; None uses the pool's socket timeout.
        """
        if self._closed:
            raise _Unsent("the store is closed")
        until = None if timeout_s is None else time.monotonic() + timeout_s
        _budget.until = until
        try:
            conn = self._pool.get_connection()
        except (RedisError, OSError) as exc:
            raise _Unsent(self._scrub(f"{type(exc).__name__}: {exc}")) from None
        finally:
            _budget.until = None
        try:
            if until is None:
                try:  # a write on an idle connection: PING first, so a dead peer is "unsent"
                    conn.check_health()
                except (RedisError, OSError) as exc:
                    conn.disconnect()
                    raise _Unsent(self._scrub(f"{type(exc).__name__}: {exc}")) from None
            out: list[Any] = []
            try:
                conn.send_packed_command(conn.pack_commands(cmds), check_health=False)
                for _ in cmds:
                    try:
                        if until is None:
                            out.append(conn.read_response())
                        else:
                            left = until - time.monotonic()
                            if left <= 0:
                                raise redis.TimeoutError("read budget spent")
                            out.append(conn.read_response(timeout=left))
                    except ResponseError as exc:
                        out.append(exc)
            except (RedisError, OSError) as exc:
                conn.disconnect()  # unread replies must never reach the next borrower
                raise _Uncertain(self._scrub(f"{type(exc).__name__}: {exc}")) from None
            return out
        finally:
            self._pool.release(conn)

    # -- writes ---------------------------------------------------------------------------

    def record(self, events: list[Event]) -> None:
        """Append events to histories and counters in one pipeline.

        The whole batch is validated and serialised first: a bad event raises ``InputError``
        naming its index and field, and nothing of the batch is sent or buffered. Raises
        ``StoreUnavailable`` when Redis cannot take the events (unless buffering is on), and
        ``StoreError`` when Redis refused some of their commands (foreign data at our keys).
        """
        packed = self._pack(events)
        if not packed:
            return
        if self._closed:
            raise StoreUnavailable(f"redis store {self.url} is closed")
        if self._buffer_max == 0:
            try:
                self._send(packed, retry=True)
            except _Uncertain as exc:
                self._count("uncertain", len(packed))
                raise StoreUnavailable(
                    f"redis store {self.url}: {len(packed)} events may or may not have been "
                    f"applied (not resent, to avoid counting them twice): {exc}"
                ) from None
            except _Unsent as exc:
                raise StoreUnavailable(
                    f"redis store {self.url}: could not record {len(packed)} events "
                    f"after {1 + len(WRITE_BACKOFF_S)} tries: {exc}"
                ) from None
            except _Rejected as exc:
                raise self._rejected_error(len(packed), exc) from None
            return
        with self._buf_lock:
            if self._buffer:  # Redis failed recently: queue behind older events, try once
                self._add_to_buffer(packed)
                self._drain()
                return
        try:
            self._send(packed, retry=True)
        except _Unsent:
            with self._buf_lock:
                self._add_to_buffer(packed)
        except _Uncertain as exc:
            self._lost_in_flight(len(packed), exc)
        except _Rejected as exc:
            raise self._rejected_error(len(packed), exc) from None

    def _pack(self, events: Iterable[Event]) -> list[_Packed]:
        """The batch validated (``check_events``) and serialised, before any of it is sent."""
        out: list[_Packed] = []
        for i, ev in enumerate(check_events(events)):
            user = str(ev.user_id)
            segments = [GLOBAL_SEGMENT]
            if ev.context:
                segments += [f"{k}={v}" for k, v in ev.context.items()]
            for what, text in (("user_id", user), *(("context", seg) for seg in segments)):
                try:  # ids go into key names as UTF-8 (the JSON values are ASCII-escaped)
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise InputError(
                        f"events[{i}].{what}: {text!r:.80} is not valid UTF-8 text: {exc.reason}"
                    ) from None
            out.append(
                _Packed(
                    self._history_key(user),
                    json.dumps([ev.item_id, ev.timestamp, ev.event_type], separators=(",", ":")),
                    json.dumps(ev.item_id),
                    ev.timestamp,
                    float(self.event_weights.get(ev.event_type, 1.0)),
                    tuple(segments),
                )
            )
        return out

    def _rejected_error(self, n: int, exc: BaseException | str) -> StoreError:
        self._count("rejected", n)
        return StoreError(
            f"redis store {self.url}: Redis refused part of a batch of {n} events (foreign data "
            f"at this store's keys; its other commands were applied, so it is not resent): {exc}"
        )

    def flush(self) -> int:
        """Send buffered events now; returns how many are still buffered.

        Raises ``StoreError`` when Redis refused part of a buffered batch (foreign data)."""
        with self._buf_lock:
            self._drain()
            return len(self._buffer)

    def _add_to_buffer(self, packed: list[_Packed]) -> None:
        over = len(self._buffer) + len(packed) - self._buffer_max
        self._buffer.extend(packed)  # the deque's maxlen drops the oldest
        if over > 0:
            total = self._count("dropped", over)
            logger.warning(
                "redis store %s unavailable and its buffer of %d events is full: dropped the "
                "%d oldest (%d dropped in total)",
                self.url,
                self._buffer_max,
                over,
                total,
            )

    def _drain(self) -> None:
        """Send the buffer in order, one try per chunk (caller holds the buffer lock).

        A chunk leaves the buffer only once Redis has it (or may have it: a lost reply is
        never resent); on any other failure it stays, in order, for the next try.
        """
        refused: list[str] = []
        n_refused = 0
        while self._buffer:
            chunk = list(islice(self._buffer, min(FLUSH_CHUNK, len(self._buffer))))
            try:
                self._send(chunk, retry=False)
            except _Unsent:
                break
            except _Uncertain as exc:
                self._popleft(len(chunk))
                self._lost_in_flight(len(chunk), exc)
                break
            except _Rejected as exc:
                self._popleft(len(chunk))
                refused.append(str(exc))
                n_refused += len(chunk)
                continue
            except Exception as exc:  # a bug: keep the events, report, do not lose them
                self._degrade("write", exc)
                logger.exception("redis store %s: buffered events kept after an error", self.url)
                break
            self._popleft(len(chunk))
        if refused:
            raise self._rejected_error(n_refused, refused[0])

    def _popleft(self, n: int) -> None:
        for _ in range(n):
            self._buffer.popleft()

    def _lost_in_flight(self, n: int, exc: BaseException) -> None:
        total = self._count("uncertain", n)
        logger.warning(
            "redis store %s: %d events may or may not have been applied (not resent, to avoid "
            "counting them twice; %d in total): %s",
            self.url,
            n,
            total,
            exc,
        )

    def _send(self, events: list[_Packed], retry: bool) -> None:
        waits = WRITE_BACKOFF_S if retry else ()
        for attempt in range(len(waits) + 1):
            cmds, migrations = self._write_commands(events)
            try:
                replies = self._roundtrip(cmds, None)
                break
            except _Unsent as exc:
                self._degrade("write", str(exc))
                if attempt == len(waits):
                    raise
                time.sleep(waits[attempt])
            except _Uncertain as exc:
                self._degrade("write", str(exc))
                raise
        errors = [r for r in replies if isinstance(r, ResponseError)]
        if errors:
            # Wrong type at a key (foreign data): the other commands did apply; say so loudly.
            first = errors[0]
            reason = self._scrub(f"{len(errors)} of {len(cmds)} commands failed, first: {first}")
            self._degrade("write", reason)
            logger.warning("redis store %s: write %s", self.url, reason)
            raise _Rejected(reason)
        self._migrated.update(migrations)
        self._recover()

    def _write_commands(
        self, events: Iterable[_Packed]
    ) -> tuple[list[tuple[Any, ...]], list[tuple[int, str]]]:
        era, t_era = self._era(time.time())
        history: dict[str, list[str]] = {}
        incr: dict[str, dict[str, float]] = {}
        for ev in events:
            if self.history_len:
                history.setdefault(ev.history_key, []).append(ev.entry)
            w = ev.weight * math.exp2((ev.timestamp - t_era) / self.half_life_s)
            for seg in ev.segments:
                counts = incr.setdefault(seg, {})
                counts[ev.member] = counts.get(ev.member, 0.0) + w
        migrations = [(era, seg) for seg in incr if (era, seg) not in self._migrated]
        cmds: list[tuple[Any, ...]] = [self._migrate_cmd(e, s) for e, s in migrations]
        for key, entries in history.items():
            cmds.append(("LPUSH", key, *entries))
            cmds.append(("LTRIM", key, 0, self.history_len - 1))
            if self.history_ttl_s is not None:
                cmds.append(("PEXPIRE", key, max(1, round(self.history_ttl_s * 1000))))
        for seg, counts in incr.items():
            key = self._pop_key(era, seg)
            cmds += [("ZINCRBY", key, repr(w), m) for m, w in counts.items()]
        return cmds, migrations

    # -- reads ----------------------------------------------------------------------------

    def fetch(
        self,
        user_id: UserId | None,
        segments: Sequence[str | None] = (None,),
        *,
        history_limit: int | None = None,
        popular_limit: int = 100,
        timeout_ms: float | None = None,
    ) -> StoreRead:
        """History and popular lists in ONE round trip, within ``timeout_ms``; never raises.

        Pass the time left before the deadline as ``timeout_ms``. On a Redis error or timeout
        the result is empty with ``ok=False`` and ``status()`` is ``"degraded"``; unreadable
        entries are skipped (also degraded). ``history_limit=None`` reads up to ``history_len``
        events; 0 skips the history, as does ``user_id=None``.
        """
        budget_ms = self.socket_timeout_ms if timeout_ms is None else timeout_ms
        now = time.time()
        era, t_era = self._era(now)
        if history_limit is None:
            history_limit = self.history_len  # another writer's longer list is still capped
        want_history = user_id is not None and history_limit > 0
        segs = list(dict.fromkeys(self._segment_name(s) for s in segments))
        if popular_limit <= 0:
            segs = []
        if not want_history and not segs:
            return StoreRead()
        if budget_ms <= 0:
            return StoreRead(ok=False)  # no time left is the caller's deadline, not Redis's fault
        migrations = [(era, s) for s in segs if (era, s) not in self._migrated]
        cmds: list[tuple[Any, ...]] = [self._migrate_cmd(e, s) for e, s in migrations]
        if want_history:
            assert user_id is not None
            cmds.append(
                ("EVAL", _HISTORY, 1, self._history_key(user_id), history_limit, MAX_VALUE_BYTES)
            )
        cmds += [
            ("ZREVRANGE", self._pop_key(era, s), 0, popular_limit - 1, "WITHSCORES") for s in segs
        ]
        try:
            replies = self._roundtrip(cmds, budget_ms / 1000.0)
        except (_Unsent, _Uncertain) as exc:
            self._degrade("read", str(exc))
            return StoreRead(ok=False)
        problems: list[str] = []
        for (e, s), reply in zip(migrations, replies, strict=False):
            if isinstance(reply, ResponseError):
                problems.append(f"era migration of {s}: {reply}")
            else:
                self._migrated.add((e, s))
        replies = replies[len(migrations) :]
        items: list[ItemId] = []
        stamps: list[float] = []
        types: list[str] = []
        if want_history:
            items, stamps, types = self._parse_history(replies.pop(0), problems)
        scale = math.exp2((t_era - now) / self.half_life_s)
        popular: dict[str | None, tuple[list[ItemId], list[float]]] = {}
        for s, reply in zip(segs, replies, strict=True):
            popular[None if s == GLOBAL_SEGMENT else s] = self._parse_popular(
                reply, scale, problems, s
            )
        if problems:
            self._degrade("read", f"{problems[0]} ({len(problems)} problems)")
            return StoreRead(items, stamps, types, popular, ok=False)
        self._recover()
        return StoreRead(items, stamps, types, popular)

    def history(
        self, user_id: UserId, limit: int | None = None, *, timeout_ms: float | None = None
    ) -> tuple[list[ItemId], list[float], list[str]]:
        """The user's last events, oldest first (empty when Redis fails)."""
        if limit is not None and limit <= 0:
            return [], [], []
        r = self.fetch(user_id, (), history_limit=limit, timeout_ms=timeout_ms)
        return r.items, r.timestamps, r.event_types

    def popular(
        self, segment: str | None, limit: int, *, timeout_ms: float | None = None
    ) -> tuple[list[ItemId], list[float]]:
        """Live top items with their decayed weight as of now (empty when Redis fails)."""
        r = self.fetch(None, (segment,), popular_limit=limit, timeout_ms=timeout_ms)
        return r.popular.get(segment, ([], []))

    def _parse_history(
        self, reply: Any, problems: list[str]
    ) -> tuple[list[ItemId], list[float], list[str]]:
        if isinstance(reply, ResponseError) or not isinstance(reply, list):
            problems.append(f"history: {reply!r:.200}")
            return [], [], []
        rows = _loads_each(reply, problems, "history entry")
        items: list[ItemId] = []
        stamps: list[float] = []
        types: list[str] = []
        for row in reversed(rows):  # stored newest first
            if row is _BAD:
                continue
            if (
                isinstance(row, list)
                and len(row) == 3
                and _is_id(row[0])
                and isinstance(row[1], int | float)
                and not isinstance(row[1], bool)
                and math.isfinite(row[1])
                and isinstance(row[2], str)
            ):
                items.append(row[0])
                stamps.append(float(row[1]))
                types.append(row[2])
            else:
                problems.append(f"history entry: {row!r:.200}")
        return items, stamps, types

    def _parse_popular(
        self, reply: Any, scale: float, problems: list[str], segment: str
    ) -> tuple[list[ItemId], list[float]]:
        if isinstance(reply, ResponseError) or not isinstance(reply, list):
            problems.append(f"popular {segment}: {reply!r:.200}")
            return [], []
        if reply and isinstance(reply[0], list):  # RESP3: [[member, score], ...]
            members = [p[0] for p in reply]
            raw_scores = [p[1] for p in reply]
        else:
            members, raw_scores = reply[0::2], reply[1::2]
        decoded = _loads_each(members, problems, f"popular {segment} member")
        ids: list[ItemId] = []
        scores: list[float] = []
        for item, raw in zip(decoded, raw_scores, strict=True):
            if item is _BAD:
                continue
            try:
                score = float(raw) * scale
            except (TypeError, ValueError):
                score = math.nan
            if _is_id(item) and math.isfinite(score):
                ids.append(item)
                scores.append(score)
            else:
                problems.append(f"popular {segment} member: {item!r:.100} {raw!r:.40}")
        return ids, scores

    # -- pushed lists ---------------------------------------------------------------------

    def neighbour_rows(
        self, source: str, items: Sequence[str], *, timeout_ms: float | None = None
    ) -> list[Row | None]:
        """The pushed rows of ``items`` for ``source`` (None for an item without one), all of
        one version, in one round trip. A malformed row is skipped (and the store degraded).

        Raises ``StoreError`` (the store degraded too) when Redis fails, when nothing was pushed
        for ``source``, or when the current version's rows are gone; and when the budget is
        spent before the read (then Redis is not at fault: the store stays ok)."""
        budget_ms = self.socket_timeout_ms if timeout_ms is None else timeout_ms
        if not items:
            return []
        if budget_ms <= 0:
            raise StoreError(f"no time left to read the pushed rows of {source!r}")
        cmd = (
            "EVAL",
            _ROWS,
            1,
            f"{self.prefix}:nb:current:{source}",
            f"{self.prefix}:nb:",
            f":{source}:",
            *items,
        )
        try:
            (reply,) = self._roundtrip([cmd], budget_ms / 1000.0)
        except (_Unsent, _Uncertain) as exc:
            raise self._rows_failed(str(exc)) from None
        if isinstance(reply, ResponseError) or not isinstance(reply, list):
            raise self._rows_failed(f"{source}: {reply!r:.200}")
        if not reply or reply[0] is None:
            raise self._rows_failed(
                f"no pushed rows for {source!r} (no current version at "
                f"{self.prefix}:nb:current:{source}): run `retrieval push`"
            )
        if len(reply) != len(items) + 2:
            raise self._rows_failed(f"{source}: {len(reply) - 2} rows for {len(items)} items")
        version = reply[0].decode("utf-8", "replace") if isinstance(reply[0], bytes) else reply[0]
        raws = reply[2:]
        if reply[1] != 1 and all(raw is None for raw in raws):
            # No marker and no row: the version's rows were deleted (or never all written).
            # With the marker, rows missing for every item just means they have no neighbours.
            raise self._rows_failed(
                f"no pushed rows for version {version} of {source!r}: run `retrieval push`"
            )
        rows: list[Row | None] = []
        problems: list[str] = []
        for item, raw in zip(items, raws, strict=True):
            if raw is None:
                rows.append(None)  # an item with no neighbours, or unknown to the build
                continue
            try:
                rows.append(unpack_row(raw))
            except RowFormatError as exc:
                problems.append(f"{source} row {item!r:.60}: {exc}")
                rows.append(None)
        if problems:
            self._degrade("rows read", f"{problems[0]} ({len(problems)} problems)")
        else:
            self._recover()
        return rows

    def _rows_failed(self, reason: str) -> StoreError:
        self._degrade("rows read", reason)
        return StoreError(f"redis store {self.url}: rows read: {self._scrub(reason)}")

    # -- result cache ---------------------------------------------------------------------

    def cache_get(self, key: str, *, timeout_ms: float | None = None) -> bytes | None:
        """A cached blend result, or None (also when Redis fails: the caller just blends)."""
        budget_ms = self.socket_timeout_ms if timeout_ms is None else timeout_ms
        if budget_ms <= 0:
            return None
        try:
            (reply,) = self._roundtrip([("GET", f"{self.prefix}:cache:{key}")], budget_ms / 1000)
        except (_Unsent, _Uncertain) as exc:
            self._degrade("cache read", str(exc))
            return None
        if reply is None:
            self._recover()
            return None
        if not isinstance(reply, bytes):
            self._degrade("cache read", f"{key}: {reply!r:.200}")
            return None
        self._recover()
        return reply

    def cache_set(
        self, key: str, value: bytes, ttl_s: float, *, timeout_ms: float | None = None
    ) -> bool:
        """Store a result for ``ttl_s``; False (and degraded) when Redis fails. Never raises."""
        budget_ms = self.socket_timeout_ms if timeout_ms is None else timeout_ms
        cmd = ("SET", f"{self.prefix}:cache:{key}", value, "PX", max(1, round(ttl_s * 1000)))
        try:
            (reply,) = self._roundtrip([cmd], budget_ms / 1000)
        except (_Unsent, _Uncertain) as exc:
            self._degrade("cache write", str(exc))
            return False
        if isinstance(reply, ResponseError):
            self._degrade("cache write", reply)
            return False
        self._recover()
        return True

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Flush what is buffered (one try), then close the pool's connections."""
        if self._closed:
            return
        if self._buffer:
            try:
                left = self.flush()
            except StoreError as exc:
                logger.error("redis store %s: %s", self.url, exc)
                left = len(self._buffer)
            if left:
                logger.warning("redis store %s closed with %d events unsent", self.url, left)
        self._closed = True
        self._pool.disconnect()

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r}, status={self.status()!r})"


def _is_id(x: object) -> bool:
    return isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool))


_BAD = object()  # an undecodable value, already reported
_scan: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]
)


def _loads_each(raw: list[Any], problems: list[str], what: str) -> list[Any]:
    """Decode each value as exactly one JSON document; ``_BAD`` (and a problem) for the rest.

    The C scanner is used because it is faster than ``json.loads`` per value (measured:
    ``benchmarks/README.md``), and checking that it consumed the whole value rejects fragments
    that joining values into one document would silently accept.
    """
    out: list[Any] = []
    for b in raw:
        if isinstance(b, bytes | str) and len(b) > MAX_VALUE_BYTES:
            # Nothing this package writes is this long: a foreign value, never worth parsing
            # inside a request's deadline (a big one took longer than the whole budget; see
            # benchmarks/README.md).
            problems.append(f"{what}: {len(b)} bytes, more than {MAX_VALUE_BYTES}")
            out.append(_BAD)
            continue
        try:
            text = b.decode("utf-8")
            value, end = _scan(text, 0)
            if end != len(text):
                raise ValueError("trailing data")
        except (StopIteration, ValueError, AttributeError):
            problems.append(f"{what}: {b!r:.200}")
            value = _BAD
        out.append(value)
    return out
