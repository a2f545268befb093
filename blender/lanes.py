"""Each source's own worker threads, so one hung source cannot starve the others.

A shared pool lets abandoned calls of a hung source pile up until no thread is left for the
healthy ones, and its non-daemon threads keep the process from exiting. A lane instead gives a
source at most ``cap`` calls in flight on threads of its own: when all of them are busy the next
call is *shed* at once (reported, never queued), and the threads are daemons, so a call that
never returns cannot hold the interpreter at exit. ``close`` waits for the calls in flight, so a
source is never closed under a running query.

The blend's own calls skip ``concurrent.futures``: a call claimed with ``try_claim`` and started
with ``start_claimed`` (or ``try_start``) hands its answer to a function that leaves it where the
caller looks and tells an :class:`Arrivals`, which wakes the waiting caller once, when the last
answer is in. A future per call would wake the caller once
per source; each wake is a round trip on the GIL, and at two request threads those round trips,
not the sources, capped throughput.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from retrieval.errors import ClosedError

__all__ = ["Arrivals", "Deliver", "Lane"]

logger = logging.getLogger(__name__)

Deliver = Callable[[Any, Any, "BaseException | None"], None]
_Job = tuple[Callable[..., Any], tuple[Any, ...], Deliver, Any]


class Lane:
    """Up to ``cap`` concurrent calls on lazily started daemon threads."""

    def __init__(self, name: str, cap: int) -> None:
        if cap < 1:
            raise ValueError(f"lane {name!r}: cap must be >= 1, got {cap}")
        self.name = name
        self.cap = cap
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Condition()
        self._in_flight = 0
        self._threads: list[threading.Thread] = []
        self._closed = False

    @property
    def in_flight(self) -> int:
        """Calls accepted and not finished (running, or about to start on an idle thread)."""
        with self._lock:
            return self._in_flight

    def try_start(
        self, fn: Callable[..., Any], args: tuple[Any, ...], deliver: Deliver, key: Any
    ) -> bool:
        """Start ``fn(*args)`` now on an idle thread, or return False when ``cap`` calls run.
        ``deliver(key, result, error)`` gets what it returned or raised, once the call no longer
        counts as in flight, so whoever it wakes may use the lane again at once."""
        return self._enqueue((fn, args, deliver, key), shed=True)

    def try_submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any] | None:
        """Start ``fn(*args)`` now on an idle thread, or return None when ``cap`` calls run."""
        fut: cf.Future[Any] = cf.Future()
        started = self._enqueue((_unless_cancelled, (fut, fn, args), _settle, fut), shed=True)
        return fut if started else None

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        """Run ``fn(*args)``, queueing behind the calls in flight when the lane is full."""
        fut: cf.Future[Any] = cf.Future()
        self._enqueue((_unless_cancelled, (fut, fn, args), _settle, fut), shed=False)
        return fut

    def try_claim(self) -> bool:
        """Count one more call in flight, or return False when ``cap`` calls run: the call is
        then run either by ``start_claimed`` or by the caller's own runner, which must
        ``unclaim`` when it is done (``close`` waits for claimed calls too)."""
        return self._claim(shed=True)

    def unclaim(self) -> None:
        """A claimed call is over."""
        with self._lock:
            self._in_flight -= 1
            if self._closed:
                self._lock.notify_all()

    def start_claimed(
        self, fn: Callable[..., Any], args: tuple[Any, ...], deliver: Deliver, key: Any
    ) -> None:
        """``try_start`` for a call already claimed with ``try_claim``."""
        self._put((fn, args, deliver, key))

    def _enqueue(self, job: _Job, shed: bool) -> bool:
        if not self._claim(shed):
            return False
        self._put(job)
        return True

    def _claim(self, shed: bool) -> bool:
        with self._lock:
            if self._closed:
                raise ClosedError(f"source lane {self.name!r} is closed: the retriever was closed")
            if shed and self._in_flight >= self.cap:
                return False
            self._in_flight += 1
            return True

    def _put(self, job: _Job) -> None:
        with self._lock:
            # Never fewer threads than calls in flight (up to cap): an accepted call never waits
            # for a thread unless the caller chose to queue.
            if len(self._threads) < min(self._in_flight, self.cap):
                t = threading.Thread(
                    target=self._work, name=f"lane-{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, deliver, key = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to ``deliver``, like a result
                error = exc
            finally:
                self.unclaim()
            try:
                deliver(key, result, error)
            except BaseException:
                logger.exception("lane %s: delivering a result failed", self.name)

    def close(self, timeout_s: float) -> bool:
        """Refuse new calls, wait up to ``timeout_s`` for those in flight; True when none is
        left running (only then may the source's resources be released)."""
        end = time.monotonic() + max(timeout_s, 0.0)
        with self._lock:
            self._closed = True
            while self._in_flight and (left := end - time.monotonic()) > 0:
                self._lock.wait(left)
            drained = self._in_flight == 0
            threads = len(self._threads)
        for _ in range(threads):
            self._jobs.put(None)  # idle threads exit; a stuck one exits when its call returns
        return drained


_CANCELLED = object()


def _unless_cancelled(fut: cf.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(*args) if fut.set_running_or_notify_cancel() else _CANCELLED


def _settle(fut: cf.Future[Any], result: Any, error: BaseException | None) -> None:
    if result is _CANCELLED:
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class Arrivals:
    """A blend's calls, each with the time it is due, and the caller waiting for them.

    The caller registers each call (``expect``) and says when it has started them all
    (``fanned_out``); each call ``arrive``s from its thread. The caller is woken only when what it
    waits for changes: when the last call due at the latest time it waits for has arrived. With
    one deadline for every source that is once per blend, when the last answer is in. ``wake`` is
    how to wake it: by default a lock it blocks on in :meth:`wait`; an asyncio caller passes a
    thread-safe callback instead.

    Calls may instead take turns on one runner thread (``in_turn``; the runner asks for the
    ``next_turn``): two hand-offs per blend instead of one per source. The caller then also
    watches the runner: once the running call has used a quarter of the time the next queued
    call has left, the queued calls are ``stalled`` and the caller starts them on their own
    threads, so a slow source costs the others at most a quarter of their time.
    """

    __slots__ = (
        "_due",
        "_fanned_out",
        "_mutex",
        "_queued",
        "_running_since",
        "_signal",
        "_until",
        "_wake",
    )

    def __init__(self, wake: Callable[[], None] | None = None) -> None:
        self._due: dict[int, float] = {}
        self._queued: list[int] = []
        self._running_since = 0.0
        self._fanned_out = False
        self._until = float("inf")
        self._mutex = threading.Lock()
        self._signal = threading.Lock()
        self._signal.acquire()
        self._wake = wake or self._release

    def expect(self, token: int, due: float) -> None:
        """Call ``token`` will arrive, and is waited for until ``due`` (monotonic)."""
        with self._mutex:
            self._due[token] = due

    def in_turn(self, tokens: list[int]) -> None:
        """These expected calls run one after another on a runner, in this order."""
        with self._mutex:
            self._queued = list(tokens)
            self._running_since = time.monotonic()

    def next_turn(self) -> int | None:
        """The runner's next call (None: none left, or the caller took them back)."""
        with self._mutex:
            if not self._queued:
                return None
            self._running_since = time.monotonic()
            return self._queued.pop(0)

    def stalled(self, force: bool = False) -> list[int]:
        """The queued calls, taken back from the runner, when it has spent too long on one
        call (or at once when ``force``); [] otherwise."""
        with self._mutex:
            at = self._stall_at()
            if not self._queued or not (force or time.monotonic() >= at):
                return []
            taken, self._queued = self._queued, []
            return taken

    def fanned_out(self) -> None:
        """Every call has been started (or given up): from now on an arrival may wake."""
        with self._mutex:
            self._fanned_out = True

    def arrive(self, token: int) -> None:
        """Call ``token`` is done; wake the caller if nothing is left due as late as it waits."""
        with self._mutex:
            self._due.pop(token, None)
            if self._fanned_out and not any(d >= self._until for d in self._due.values()):
                self._wake()

    def until(self) -> float | None:
        """When to look again: the latest time a call still worth waiting for is due, or
        earlier, when queued calls would count as stalled; None when every call has arrived or
        is past its time."""
        now = time.monotonic()
        with self._mutex:
            due = [d for d in self._due.values() if d > now]
            self._until = max(due) if due else float("inf")
            return min(max(due), self._stall_at()) if due else None

    def wait(self, restart: Callable[[list[int]], None]) -> None:
        """Block until every call has arrived or is past its time; stalled queued calls go to
        ``restart``."""
        while (until := self.until()) is not None:
            self._signal.acquire(timeout=max(until - time.monotonic(), 0.0))
            if stalled := self.stalled():
                restart(stalled)

    def _stall_at(self) -> float:
        if not self._queued:
            return float("inf")
        since = self._running_since
        return since + 0.25 * (min(self._due[t] for t in self._queued) - since)

    def _release(self) -> None:
        if self._signal.locked():  # under the mutex: one wake per wait, never a double release
            self._signal.release()
