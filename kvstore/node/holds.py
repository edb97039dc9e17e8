"""Handles a node gives clients for in-flight puts and reads, reclaimed after a TTL.

A client that dies between Allocate and Commit (or Acquire and Release) must
not leak arena memory: every hold carries a deadline and :meth:`Holds.reap`
releases the expired ones. Handles are random (unguessable) and belong to the
session that got them (``owner``): another session's COMMIT/ABORT/RELEASE of
them finds nothing. One session holds at most ``per_owner`` at a time.
Thread-safe.
"""

from __future__ import annotations

import logging
import secrets
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
    owner: bytes = b""


class TooManyHolds(Exception):
    """The session already holds ``per_owner`` handles."""


class Holds:
    def __init__(self, ttl: float, per_owner: int = 1 << 16) -> None:
        self.ttl = ttl
        self.per_owner = per_owner
        self._holds: dict[int, Hold] = {}
        self._owned: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self.reaped = 0

    def add(self, obj: Releasable, key: bytes, owner: bytes = b"") -> int:
        """A new random handle for ``obj``; TooManyHolds if ``owner`` is at its cap."""
        with self._lock:
            if self._owned.get(owner, 0) >= self.per_owner:
                raise TooManyHolds(f"session holds {self.per_owner} handles already")
            h = secrets.randbits(63) or 1
            while h in self._holds:
                h = secrets.randbits(63) or 1
            self._holds[h] = Hold(obj, key, time.monotonic() + self.ttl, owner)
            self._owned[owner] = self._owned.get(owner, 0) + 1
            return h

    def _pop(self, handle: int) -> Hold:
        hold = self._holds.pop(handle)
        left = self._owned[hold.owner] - 1
        if left:
            self._owned[hold.owner] = left
        else:
            del self._owned[hold.owner]
        return hold

    def take(self, handle: int, owner: bytes = b"") -> Hold | None:
        """Remove and return the hold (the caller now owns ``obj``); None if unknown,
        expired or another session's."""
        with self._lock:
            hold = self._holds.get(handle)
            if hold is None or hold.owner != owner:
                return None
            return self._pop(handle)

    def release(self, handle: int, owner: bytes = b"") -> bool:
        hold = self.take(handle, owner)
        if hold is None:
            return False
        hold.obj.release()
        return True

    def reap(self, now: float | None = None) -> int:
        """Release every expired hold; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [h for h, hold in self._holds.items() if hold.deadline <= now]
            taken = [self._pop(h) for h in expired]
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
            taken, self._holds, self._owned = list(self._holds.values()), {}, {}
        for hold in taken:
            hold.obj.release()
