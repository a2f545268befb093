"""A per-source circuit breaker: stop calling a source that keeps failing, probe it later."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    """Where a :class:`CircuitBreaker` stands; derived from the clock on every read, so a
    cool-down ends without anyone calling the breaker."""

    CLOSED = "closed"
    """Healthy: every request calls the source."""
    OPEN = "open"
    """Failing: no request calls the source until ``cooldown_s`` has passed."""
    HALF_OPEN = "half_open"
    """Cool-down over: the next request probes the source, the others still skip it."""


class CircuitBreaker:
    """Opens after ``failures`` consecutive failures or timeouts; after ``cooldown_s`` one probe.

    While a probe is in flight other requests skip the source; the probe's outcome closes the
    breaker or opens it for another cool-down. Skipping a sick source keeps the pool free for the
    healthy ones instead of parking threads on a source that will time out anyway.
    """

    def __init__(
        self,
        failures: int = 5,
        cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._consecutive = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        """The state now (thread-safe), to inspect or monitor. Only :meth:`allow` claims
        the probe, so reading the state changes nothing."""
        with self._lock:
            return self._state()

    def _state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock() - self._opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allow(self) -> bool:
        """Whether this request may call the source (claims the probe when half-open)."""
        with self._lock:
            state = self._state()
            if state is BreakerState.CLOSED:
                return True
            if state is BreakerState.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def success(self) -> None:
        """The source answered: close the breaker and reset the count. One success ends any
        run of failures, so only consecutive failures open it."""
        with self._lock:
            self._consecutive = 0
            self._opened_at = None
            self._probing = False

    def failure(self) -> None:
        """The source failed or timed out on its own: count it, and open the breaker (again)
        when the count reaches ``failures`` or the failed call was the half-open probe."""
        with self._lock:
            self._consecutive += 1
            if self._probing or self._consecutive >= self.failures:
                self._opened_at = self._clock()
            self._probing = False

    def reset(self) -> None:
        """Closed, with no failures counted: outcomes before it (the retriever's warm-up
        blends) are not the source's record."""
        self.success()

    def release(self) -> None:
        """Give back a claimed probe without an outcome (the source was skipped)."""
        with self._lock:
            self._probing = False
