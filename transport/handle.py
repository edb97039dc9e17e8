"""Completion handles: pollable, blocking and awaitable, with deadlines and cancellation.

A :class:`Handle` stands for one posted batch. A backend splits the batch into
*parts* (stripes on parallel connections, one copy per descriptor, ...) and
reports each part's end with :meth:`Handle._part_done`; the handle completes
once every part has ended. That rule is what makes the buffer contract hold:
**a handle is done only after the backend has stopped touching the caller's
buffers**, whether it succeeded, failed, was cancelled or timed out.

Outcome precedence when several things happen: cancellation, then deadline
expiry (:class:`~kvstore.errors.Timeout`), then the first part's error.

Thread-safety: every method may be called from any thread. Done callbacks run
on the thread that completes the handle (a backend worker) and must not block.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from kvstore.errors import KVStoreError, Timeout


class Cancelled(KVStoreError):
    """The operation was cancelled by its caller; the ranges' contents are undefined."""


PENDING, DONE, FAILED = "pending", "done", "failed"


class Handle:
    """Completion of one batched operation. See the module docstring."""

    def __init__(self, what: str, nbytes: int, deadline: float | None) -> None:
        self.what = what
        self.nbytes = nbytes
        self.deadline = deadline
        """``time.monotonic()`` value after which the operation fails with Timeout."""
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._parts = 1
        self._error: BaseException | None = None
        self._cancelled = False
        self._expired = False
        self._abort: Callable[[], None] | None = None
        self._callbacks: list[Callable[[Handle], None]] = []
        self._done = False
        self.started = time.monotonic()
        self.finished: float | None = None

    # ---- caller side -------------------------------------------------------
    def done(self) -> bool:
        """True once the operation ended (either way). Never blocks, never raises."""
        return self._done

    def poll(self) -> str:
        """``"pending"``, ``"done"`` or ``"failed"``. Never blocks, never raises."""
        if not self._done:
            return PENDING
        return DONE if self._error is None else FAILED

    def exception(self) -> BaseException | None:
        """The error of a finished operation, ``None`` on success or while pending."""
        return self._error if self._done else None

    def wait(self, timeout: float | None = None) -> None:
        """Block until done; raise its error. ``timeout`` bounds only this wait.

        Raises :class:`~kvstore.errors.Timeout` if the wait itself times out (the
        operation goes on; its own deadline still applies).
        """
        if not self._event.wait(timeout):
            raise Timeout(f"{self.what}: still pending after waiting {timeout}s")
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> int:
        """Like :meth:`wait`; returns the number of bytes moved."""
        self.wait(timeout)
        return self.nbytes

    def cancel(self) -> bool:
        """Request cancellation. Non-blocking; returns False if already done.

        The handle completes (with :class:`Cancelled`) once the backend has
        stopped touching the buffers; ranges may be partially transferred.
        """
        with self._lock:
            if self._done:
                return False
            self._cancelled = True
            abort = self._abort
        if abort is not None:
            abort()
        return True

    def add_done_callback(self, fn: Callable[[Handle], None]) -> None:
        """Call ``fn(handle)`` once done (at once, on this thread, if already done)."""
        with self._lock:
            if not self._done:
                self._callbacks.append(fn)
                return
        fn(self)

    def __await__(self) -> Generator[Any, None, int]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not fut.done():
                fut.set_result(None)

        def wake(_: Handle) -> None:
            loop.call_soon_threadsafe(settle)

        self.add_done_callback(wake)
        try:
            yield from fut.__await__()
        except asyncio.CancelledError:
            self.cancel()
            raise
        if self._error is not None:
            raise self._error
        return self.nbytes

    def __repr__(self) -> str:
        return f"Handle({self.what!r}, {self.nbytes} B, {self.poll()})"

    # ---- backend side ------------------------------------------------------
    @property
    def aborted(self) -> bool:
        """True once cancelled or expired: parts not yet started must not start."""
        return self._cancelled or self._expired

    def remaining(self) -> float | None:
        """Seconds to the deadline (>= 0), or None without a deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def _set_parts(self, n: int) -> None:
        """Declare ``n`` parts (call before any part is reported)."""
        with self._lock:
            self._parts = n
        if n == 0:
            self._finish()

    def _set_abort(self, fn: Callable[[], None]) -> None:
        """``fn`` stops in-flight parts (called on cancel or expiry, from any thread)."""
        with self._lock:
            self._abort = fn
            run = self.aborted and not self._done
        if run:
            fn()

    def _part_done(self, error: BaseException | None = None) -> None:
        with self._lock:
            if self._done:
                return
            if error is not None and self._error is None:
                self._error = error
            self._parts -= 1
            last = self._parts <= 0
        if last:
            self._finish()

    def _expire(self) -> None:
        with self._lock:
            if self._done:
                return
            self._expired = True
            abort = self._abort
        if abort is not None:
            abort()

    def _finish(self) -> None:
        with self._lock:
            if self._done:
                return
            if self._cancelled:
                self._error = Cancelled(f"{self.what}: cancelled")
            elif self._expired:
                self._error = Timeout(f"{self.what}: deadline expired before completion")
            self._done = True
            self.finished = time.monotonic()
            callbacks, self._callbacks = self._callbacks, []
        self._event.set()
        for fn in callbacks:
            fn(self)


class _Watchdog:
    """One daemon thread that expires handles at their deadlines."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Handle]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, handle: Handle) -> None:
        if handle.deadline is None:
            return
        with self._cv:
            heapq.heappush(self._heap, (handle.deadline, next(self._seq), handle))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kvt-deadlines", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap:
                    self._cv.wait()
                when, _, h = self._heap[0]
                delay = when - time.monotonic()
                if delay > 0:
                    self._cv.wait(delay)
                    continue
                heapq.heappop(self._heap)
            if not h.done():
                h._expire()


watchdog = _Watchdog()
