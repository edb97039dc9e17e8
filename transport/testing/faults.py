"""A fault-injecting wrapper around any transport, for tests.

``FaultyTransport(inner, FaultPlan(...))`` behaves like ``inner`` except that
posted batches can be dropped (never complete: the deadline fires), delayed,
truncated (only the first half of each range moves, then TransportError), or
failed once a byte budget is spent (``fail_after_bytes``). Memory, metadata,
connect and notifications are ``inner``'s own, so regions registered through
the wrapper are usable with ``inner`` too. Thread-safe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from kvstore.errors import TransportError
from transport.base import Peer, Transport
from transport.handle import Handle
from transport.regions import Desc, Region


@dataclass
class FaultPlan:
    """Which faults to inject; every field off by default."""

    drop: bool = False
    """Posted batches never complete (until their deadline or a cancel)."""
    delay: float = 0.0
    """Seconds to wait before passing a batch on."""
    truncate: bool = False
    """Move only the first half of each range, then fail with TransportError."""
    fail_after_bytes: int | None = None
    """Fail every batch once this many bytes have been posted in total."""


class FaultyTransport(Transport):
    """See the module docstring."""

    def __init__(self, inner: Transport, plan: FaultPlan) -> None:
        self.scheme = inner.scheme  # type: ignore[misc]
        self.capabilities = inner.capabilities  # type: ignore[misc]
        super().__init__(inner.uri, inner.options)
        self.inner = inner
        self.plan = plan
        self.notifications = inner.notifications
        self._regions = inner._regions  # one registration table: regions work through both
        self._budget_lock = threading.Lock()
        self._sent = 0

    def register(self, buf: Any, *, name: str = "") -> Region:
        return self.inner.register(buf, name=name)

    def allocate(self, nbytes: int, *, name: str = "") -> Region:
        return self.inner.allocate(nbytes, name=name)

    def deregister(self, region: Region, timeout: float = 30.0) -> None:
        self.inner.deregister(region, timeout)

    def _metadata(self) -> bytes:
        return self.inner.metadata()

    def _connect(self, metadata: bytes, timeout: float) -> Peer:
        return self.inner.connect(metadata, timeout=timeout)

    def _inject(self, h: Handle, descs: list[Desc], post: Any) -> None:
        plan = self.plan
        if plan.drop:
            h._set_abort(lambda: h._part_done(None))
            return
        fail: str | None = None
        if plan.truncate:
            descs = [d._replace(length=max(1, d.length // 2)) for d in descs]
            fail = "truncated transfer"
        if plan.fail_after_bytes is not None:
            with self._budget_lock:
                left = plan.fail_after_bytes - self._sent
                self._sent += h.nbytes
            if left < h.nbytes:
                cut: list[Desc] = []
                for d in descs:
                    if left <= 0:
                        break
                    cut.append(d._replace(length=min(d.length, left)))
                    left -= cut[-1].length
                descs, fail = cut, "link failed after the byte budget"

        def go() -> None:
            if h.aborted:
                h._part_done(None)
                return
            if not descs:
                h._part_done(TransportError(f"{h.what}: {fail}"))
                return
            inner: Handle = post(descs)
            h._set_abort(lambda: _cancel(inner))
            inner.add_done_callback(
                lambda ih: h._part_done(ih.exception() or (TransportError(f"{h.what}: {fail}") if fail else None))
            )

        if plan.delay:
            timer = threading.Timer(plan.delay, go)
            timer.daemon = True

            def stop() -> None:
                timer.cancel()
                h._part_done(None)

            h._set_abort(stop)
            timer.start()
        else:
            go()

    def _post_write(self, peer: Peer, descs: list[Desc], h: Handle, checksum: bool,
                    notify: bytes | None) -> None:
        self._inject(h, descs, lambda ds: self.inner.write(
            peer, ds, timeout=h.remaining(), checksum=checksum,
            notify=None if self.plan.truncate else notify))

    def _post_read(self, peer: Peer, descs: list[Desc], h: Handle, checksum: bool) -> None:
        self._inject(h, descs, lambda ds: self.inner.read(peer, ds, timeout=h.remaining(), checksum=checksum))

    def _post_notify(self, peer: Peer, msg: bytes, h: Handle) -> None:
        if self.plan.drop:
            h._set_abort(lambda: h._part_done(None))
            return
        inner = self.inner.notify(peer, msg, timeout=h.remaining())
        h._set_abort(lambda: _cancel(inner))
        inner.add_done_callback(lambda ih: h._part_done(ih.exception()))

    def _close(self) -> None:
        self.inner.close()


def _cancel(h: Handle) -> None:
    h.cancel()
