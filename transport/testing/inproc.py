"""``inproc://name`` — both sides in one process; copies on a worker thread. For tests.

Endpoint metadata is the transport's name; ``connect`` finds it in a
process-wide table. Every batch is executed asynchronously on the *posting*
transport's worker thread, so handles really are pending after posting; with
``?delay=0.01`` each batch waits that long first (to test deadlines/cancel).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable

from kvstore.checksum import checksum as xxh
from kvstore.errors import Corruption, InvalidArgument, KVStoreError, TransportError
from transport.base import Capabilities, Peer, Transport, TransportOptions
from transport.handle import Handle
from transport.regions import Desc, RemoteRegion

_live: dict[str, InprocTransport] = {}
_lock = threading.Lock()


class InprocPeer(Peer):
    def __init__(self, target: InprocTransport) -> None:
        super().__init__(f"inproc://{target.name}", target.name.encode())
        self.target = target

    def alive(self) -> bool:
        return not self.closed and not self.target._closed


class InprocTransport(Transport):
    """See the module docstring."""

    scheme = "inproc"
    capabilities = Capabilities(
        same_host_only=True, zero_copy=True, device_memory=False, remote=False, in_process=True,
        mappable=True,
    )

    def __init__(self, uri: str, options: TransportOptions | None = None) -> None:
        super().__init__(uri, options)
        if not self.name:
            self.name = f"anon-{os.urandom(4).hex()}"
        self.delay = float(self.options.params.get("delay", "0"))
        with _lock:
            if self.name in _live:
                raise InvalidArgument(f"inproc://{self.name} already exists in this process")
            _live[self.name] = self
        self._q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"inproc-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._q.get()) is not None:
            job()

    def _metadata(self) -> bytes:
        return self.name.encode()

    def _connect(self, metadata: bytes, timeout: float) -> Peer:
        with _lock:
            target = _live.get(metadata.decode(errors="replace"))
        if target is None or target._closed:
            raise TransportError(f"no inproc transport named {metadata!r} in this process")
        return InprocPeer(target)

    def _map_remote(self, peer: Peer, remote: RemoteRegion, deadline: float | None) -> memoryview:
        r = _peer(peer).target._regions.get(remote.region_id)
        if r is None or r.view is None:
            raise InvalidArgument(f"region {remote.region_id} is not registered at {peer.name}")
        return r.view

    def _job(self, h: Handle, fn: Callable[[], None]) -> None:
        def run() -> None:
            if self.delay:
                time.sleep(self.delay)
            err: BaseException | None = None
            if not h.aborted:
                try:
                    fn()
                except KVStoreError as e:
                    err = e
            h._part_done(err)

        self._q.put(run)

    def _copy(self, peer: Peer, descs: list[Desc], write: bool, checksum: bool) -> None:
        target = _peer(peer).target
        if target._closed:
            raise TransportError(f"{peer.name} is closed")
        for i, d in enumerate(descs):
            r = target._acquire(d.remote.region_id)
            if r is None or r.view is None or d.remote_offset + d.length > r.nbytes:
                if r is not None:
                    target._release(r.id)
                raise InvalidArgument(f"descriptor {i}: remote range outside {peer.name}'s region")
            try:
                assert d.local.view is not None
                lv = d.local.view[d.local_offset : d.local_offset + d.length]
                rv = r.view[d.remote_offset : d.remote_offset + d.length]
                src, dst = (lv, rv) if write else (rv, lv)
                dst[:] = src
                if checksum and xxh(dst) != xxh(src):
                    raise Corruption(f"descriptor {i}: checksum mismatch on arrival")
            finally:
                target._release(r.id)

    def _post_write(self, peer: Peer, descs: list[Desc], h: Handle, checksum: bool,
                    notify: bytes | None) -> None:
        def run() -> None:
            self._copy(peer, descs, True, checksum)
            if notify is not None:
                _peer(peer).target.notifications.deliver(notify)

        self._job(h, run)

    def _post_read(self, peer: Peer, descs: list[Desc], h: Handle, checksum: bool) -> None:
        self._job(h, lambda: self._copy(peer, descs, False, checksum))

    def _post_notify(self, peer: Peer, msg: bytes, h: Handle) -> None:
        self._job(h, lambda: _peer(peer).target.notifications.deliver(msg))

    def _close(self) -> None:
        with _lock:
            _live.pop(self.name, None)
        self._q.put(None)


def _peer(peer: Peer) -> InprocPeer:
    if not isinstance(peer, InprocPeer):  # a peer from another transport: caller error
        raise InvalidArgument(f"peer {peer.name} was not connected by an inproc:// transport")
    return peer
