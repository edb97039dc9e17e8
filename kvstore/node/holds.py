"""Handles a node gives clients for in-flight puts and reads, reclaimed after a TTL.

A client that dies between Allocate and Commit (or Acquire and Release) must
not leak arena memory: every hold carries a deadline and :meth:`Holds.reap`
releases the expired ones. Thread-safe.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class Releasable(Protocol):
    def release(self) -> None: ...


@dataclass
class Hold:
    obj: Releasable
    key: bytes
    deadline: float


class Holds:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._holds: dict[int, Hold] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.reaped = 0

    def add(self, obj: Releasable, key: bytes) -> int:
        with self._lock:
            h = next(self._ids)
            self._holds[h] = Hold(obj, key, time.monotonic() + self.ttl)
            return h

    def take(self, handle: int) -> Hold | None:
        """Remove and return the hold (the caller now owns ``obj``); None if unknown/expired."""
        with self._lock:
            return self._holds.pop(handle, None)

    def release(self, handle: int) -> bool:
        hold = self.take(handle)
        if hold is None:
            return False
        hold.obj.release()
        return True

    def reap(self, now: float | None = None) -> int:
        """Release every expired hold; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [h for h, hold in self._holds.items() if hold.deadline <= now]
            taken = [self._holds.pop(h) for h in expired]
        for hold in taken:
            hold.obj.release()
        if taken:
            self.reaped += len(taken)
            log.warning("reclaimed %d hold(s) a client kept past %.0fs", len(taken), self.ttl)
        return len(taken)

    def __len__(self) -> int:
        return len(self._holds)

    def close(self) -> None:
        with self._lock:
            taken, self._holds = list(self._holds.values()), {}
        for hold in taken:
            hold.obj.release()
