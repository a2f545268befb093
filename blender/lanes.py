"""Each source's own worker threads, so one hung source cannot starve the others.

A shared pool lets abandoned calls of a hung source pile up until no thread is left for the
healthy ones, and its non-daemon threads keep the process from exiting. A lane instead gives a
source at most ``cap`` calls in flight on threads of its own: when all of them are busy the next
call is *shed* at once (reported, never queued), and the threads are daemons, so a call that
never returns cannot hold the interpreter at exit. ``close`` waits for the calls in flight, so a
source is never closed under a running query.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from retrieval.errors import ClosedError

__all__ = ["Lane"]

_Job = tuple[cf.Future[Any], Callable[..., Any], tuple[Any, ...]]


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

    def try_submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any] | None:
        """Start ``fn(*args)`` now on an idle thread, or return None when ``cap`` calls run."""
        return self._submit(fn, args, shed=True)

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        """Run ``fn(*args)``, queueing behind the calls in flight when the lane is full."""
        fut = self._submit(fn, args, shed=False)
        assert fut is not None
        return fut

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], shed: bool
    ) -> cf.Future[Any] | None:
        fut: cf.Future[Any] = cf.Future()
        with self._lock:
            if self._closed:
                raise ClosedError(f"source lane {self.name!r} is closed: the retriever was closed")
            if shed and self._in_flight >= self.cap:
                return None
            self._in_flight += 1
            # Never fewer threads than calls in flight (up to cap): an accepted call never waits
            # for a thread unless the caller chose to queue.
            if len(self._threads) < min(self._in_flight, self.cap):
                t = threading.Thread(
                    target=self._work, name=f"lane-{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
        self._jobs.put((fut, fn, args))
        return fut

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args = job
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as exc:  # the future carries it to whoever waits
                        fut.set_exception(exc)
            finally:
                with self._lock:
                    self._in_flight -= 1
                    self._lock.notify_all()

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
