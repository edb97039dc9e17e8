"""Receiver-side notification inbox ("layer l has landed").

A peer sends a notification with :meth:`Transport.notify` or attaches one to a
write; the backend delivers it here only after the data it follows has landed.
Messages are opaque bytes (at most :data:`MAX_NOTIFY` long); each delivered
message can be consumed exactly once. Thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time

from kvstore.errors import Timeout

MAX_NOTIFY = 64 * 1024


class Notifications:
    """Inbox of notifications received by one transport."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._counts: collections.Counter[bytes] = collections.Counter()
        self._order: collections.deque[bytes] = collections.deque()

    def deliver(self, msg: bytes) -> None:
        """Backend side: add one message. Never blocks for long, never raises."""
        with self._cv:
            self._counts[msg] += 1
            self._order.append(msg)
            self._cv.notify_all()

    def wait_for(self, msg: bytes, timeout: float | None = None) -> None:
        """Block until ``msg`` has arrived and consume one occurrence of it.

        Raises :class:`~kvstore.errors.Timeout` after ``timeout`` seconds.
        """
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._counts[msg] == 0:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"notification {msg!r} not received within {timeout}s")
                self._cv.wait(left)
            self._take(msg)

    async def wait_for_async(self, msg: bytes, timeout: float | None = None) -> None:
        """Awaitable :meth:`wait_for` (waits on a worker thread, not the event loop)."""
        await asyncio.get_running_loop().run_in_executor(None, self.wait_for, msg, timeout)

    def try_take(self, msg: bytes) -> bool:
        """Consume one occurrence of ``msg`` if present. Never blocks."""
        with self._cv:
            if self._counts[msg] == 0:
                return False
            self._take(msg)
            return True

    def take_all(self) -> list[bytes]:
        """Consume and return every pending message in arrival order. Never blocks."""
        with self._cv:
            out = list(self._order)
            self._order.clear()
            self._counts.clear()
            return out

    def _take(self, msg: bytes) -> None:
        self._counts[msg] -= 1
        if self._counts[msg] == 0:
            del self._counts[msg]
        self._order.remove(msg)
