from blender.breaker import BreakerState, CircuitBreaker


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_opens_after_n_failures_and_closes_after_probe():
    clock = Clock()
    b = CircuitBreaker(failures=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.failure()
    assert b.state is BreakerState.CLOSED
    b.failure()
    assert b.state is BreakerState.OPEN
    assert not b.allow()
    clock.t = 10.5
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()  # the probe
    assert not b.allow()  # only one probe at a time
    b.success()
    assert b.state is BreakerState.CLOSED
    assert b.allow()


def test_failed_probe_reopens():
    clock = Clock()
    b = CircuitBreaker(failures=1, cooldown_s=5, clock=clock)
    b.failure()
    clock.t = 6
    assert b.allow()
    b.failure()
    assert b.state is BreakerState.OPEN
    clock.t = 10
    assert not b.allow()
    clock.t = 11.5
    assert b.allow()


def test_success_resets_consecutive_count():
    b = CircuitBreaker(failures=2, cooldown_s=5)
    b.failure()
    b.success()
    b.failure()
    assert b.state is BreakerState.CLOSED
