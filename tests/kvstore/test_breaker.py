"""Circuit breaker: opens after consecutive failures, backs off, probes one at a time."""

from kvstore.client.breaker import Breaker


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_opens_after_threshold_and_backs_off_doubling() -> None:
    clock = Clock()
    b = Breaker(threshold=2, base=1.0, cap=4.0, clock=clock)
    assert b.allow()
    b.failure()
    assert b.allow() and not b.is_open  # one failure: still closed
    b.failure()
    assert b.is_open and not b.allow() and b.rejected == 1
    clock.t += 1.0
    assert b.allow()  # the probe
    assert not b.allow()  # only one at a time
    b.failure()  # probe failed: back-off doubles
    clock.t += 1.5
    assert not b.allow()
    clock.t += 0.6
    assert b.allow()
    b.failure()
    clock.t += 3.9  # capped at 4 s
    assert not b.allow()
    clock.t += 0.2
    assert b.allow()
    b.success()
    assert not b.is_open and b.allow() and b.allow()


def test_success_resets_the_failure_count() -> None:
    b = Breaker(threshold=3)
    b.failure()
    b.failure()
    b.success()
    b.failure()
    b.failure()
    assert not b.is_open
