"""``shm://[name]`` — same-host zero-copy transport.

Memory from :meth:`ShmTransport.allocate` lives in a memfd segment that peers
map; any other registered host buffer is reached with cross-memory attach. In
both cases a transfer is one copy straight into the destination, done by the
side that posts it, split over ``options.streams`` copy threads for large
batches. A Unix socket in the abstract namespace carries only control traffic
(segment descriptors, checksums, notifications); nothing is left on disk if a
process is killed. Peers must be on the same host and run as the same user:
the server checks each connecting process's uid (``SO_PEERCRED``) and serves
only its own uid (plus those listed in ``?uids=1001,1002``); segments are
memfds sealed at their size, and a peer refuses to map an unsealed one.
"""

from __future__ import annotations

import os
import socket
import struct
from concurrent.futures import ThreadPoolExecutor

from kvstore.errors import InvalidArgument, KVStoreError, TransportError
from transport.base import Capabilities, Peer, Transport, TransportOptions
from transport.handle import Handle
from transport.regions import Desc, Region, RemoteRegion
from transport.serving import FrameServer
from transport.shm.client import CMA_EXTRA, ShmPeer, run_stripe
from transport.shm.memory import KIND_CMA, KIND_FD, address, segment
from transport.shm.server import handlers
from transport.stripes import compose, split
from transport.wire import NOTIFY, PING

_META = struct.Struct("<4sI")
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_MAGIC = b"KVS1"


class ShmTransport(Transport):
    """See the module docstring."""

    scheme = "shm"
    capabilities = Capabilities(same_host_only=True, zero_copy=True, device_memory=False, remote=False,
                                mappable=True)

    def __init__(self, uri: str, options: TransportOptions | None = None) -> None:
        super().__init__(uri, options)
        try:
            extra = {int(u) for u in self.options.params.get("uids", "").split(",") if u.strip()}
        except ValueError as e:
            raise InvalidArgument(f"shm:// ?uids= takes numeric uids, e.g. ?uids=1000,1001: {e}") from e
        self.allowed_uids = frozenset({os.getuid(), *extra})
        self._sock_name = f"\0kvstore-shm-{os.getpid()}-{os.urandom(6).hex()}".encode()
        self._server: FrameServer | None = None
        if self.options.listen:
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            lsock.bind(self._sock_name)
            lsock.listen(64)
            self._server = FrameServer(lsock, handlers(self), f"shm-server-{os.getpid()}", admit=self._admit,
                                       max_connections=self.options.max_connections)
        self._pool = ThreadPoolExecutor(self.options.streams, thread_name_prefix="shm-copy")
        self._peers: list[ShmPeer] = []

    def _admit(self, conn: socket.socket) -> str | None:
        """Only processes of an allowed uid may talk to this transport (the kernel says who)."""
        pid, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        if uid not in self.allowed_uids:
            return f"pid {pid} runs as uid {uid}, not one of {sorted(self.allowed_uids)}"
        return None

    def allocate(self, nbytes: int, *, name: str = "") -> Region:
        """A shared segment peers map directly (the fastest shm:// memory)."""
        if nbytes <= 0:
            raise InvalidArgument(f"allocate {name}: size must be > 0, got {nbytes}")
        fd, m = segment(nbytes, name or "region")
        view = memoryview(m)
        region = Region(0, nbytes, view, m, id(self), name, backend=(fd, m))
        region.id = next(self._ids)
        region.extra = bytes([KIND_FD])
        with self._reg_cv:
            self._regions[region.id] = region
        return region

    def _register(self, region: Region) -> None:
        if region.view is not None and region.backend is None:
            region.extra = CMA_EXTRA.pack(KIND_CMA, os.getpid(), address(region.view))

    def _deregister(self, region: Region) -> None:
        if isinstance(region.backend, tuple):
            fd, m = region.backend
            os.close(fd)
            if region.view is not None:
                region.view.release()
            try:
                m.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes with it

    def _map_remote(self, peer: Peer, remote: RemoteRegion, deadline: float | None) -> memoryview:
        if not remote.extra or remote.extra[0] != KIND_FD:
            raise InvalidArgument(f"region {remote.region_id} of {peer.name} is not a shared segment")
        return _shm(peer).mapping(remote, deadline)

    def _metadata(self) -> bytes:
        return _META.pack(_MAGIC, os.getpid()) + self._sock_name

    def _connect(self, metadata: bytes, timeout: float) -> Peer:
        if len(metadata) < _META.size or metadata[:4] != _MAGIC:
            raise InvalidArgument("not shm:// endpoint metadata")
        _, pid = _META.unpack_from(metadata)
        peer = ShmPeer(f"shm://pid-{pid}", metadata, metadata[_META.size :], timeout)
        peer.request(PING, [], b"", None)
        self._peers.append(peer)
        return peer

    def _post(self, write: bool, peer: Peer, descs: list[Desc], h: Handle, checksum: bool,
              notify: bytes | None) -> None:
        p = _shm(peer)
        parts = split(descs, self.options.streams, self.options.stripe_min)
        then = None
        if notify is not None:
            def then() -> None:
                self._submit(h, lambda: p.request(NOTIFY, [], notify, h.deadline))

        data = compose(h, len(parts), then)
        for part in parts:
            self._submit(data, lambda part=part: run_stripe(p, part, write, h, checksum))

    def _submit(self, report: Handle, fn: object) -> None:
        def run() -> None:
            err: BaseException | None = None
            try:
                fn()  # type: ignore[operator]
            except KVStoreError as e:
                err = e
            except OSError as e:
                err = TransportError(f"{report.what}: {e}")
            report._part_done(err)

        try:
            self._pool.submit(run)
        except RuntimeError as e:  # pool shut down by close()
            report._part_done(TransportError(f"{report.what}: transport closed ({e})"))

    def _post_write(self, peer: Peer, descs: list[Desc], h: Handle, checksum: bool,
                    notify: bytes | None) -> None:
        self._post(True, peer, descs, h, checksum, notify)

    def _post_read(self, peer: Peer, descs: list[Desc], h: Handle, checksum: bool) -> None:
        self._post(False, peer, descs, h, checksum, None)

    def _post_notify(self, peer: Peer, msg: bytes, h: Handle) -> None:
        p = _shm(peer)
        self._submit(h, lambda: p.request(NOTIFY, [], msg, h.deadline))

    def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for p in self._peers:
            p.close()
        self._pool.shutdown(wait=False, cancel_futures=False)


def _shm(peer: Peer) -> ShmPeer:
    if not isinstance(peer, ShmPeer):  # a peer from another transport: caller error
        raise InvalidArgument(f"peer {peer.name} was not connected by an shm:// transport")
    return peer
