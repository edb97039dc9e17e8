"""A circuit breaker: stop calling a peer that keeps failing, probe it now and then.

Engines ask the pool on their scheduling path; when the master (or a node) is
down, every call would wait for its timeout and stall the engine. A
:class:`Breaker` opens after ``threshold`` consecutive failures: while open,
:meth:`Breaker.allow` answers ``False`` at once (the caller treats it as a miss)
for a back-off that doubles with every failed probe, from ``base`` up to ``cap``
seconds; when it lapses, one caller at a time is let through as a probe. A
success closes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Breaker:
    """Thread-safe. ``Breaker(threshold=3, base=0.5, cap=30.0)``."""

    def __init__(self, threshold: int = 3, base: float = 0.5, cap: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if threshold < 1 or base <= 0 or cap < base:
            raise ValueError("Breaker: threshold >= 1 and 0 < base <= cap")
        self.threshold, self.base, self.cap = threshold, base, cap
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opens = 0  # consecutive openings: the back-off exponent
        self._until = 0.0
        self._probing = False
        self.rejected = 0
        """Calls answered ``False`` while open (for stats)."""

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._failures >= self.threshold

    def allow(self) -> bool:
        """May the caller call the peer now? (While open: only one probe after the back-off.)"""
        with self._lock:
            if self._failures < self.threshold:
                return True
            if self._probing or self._clock() < self._until:
                self.rejected += 1
                return False
            self._probing = True
            return True

    def success(self) -> None:
        with self._lock:
            self._failures, self._opens, self._probing = 0, 0, False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._failures >= self.threshold:
                self._until = self._clock() + min(self.cap, self.base * 2 ** self._opens)
                self._opens += 1
                self._probing = False
