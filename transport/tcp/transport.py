"""``tcp://host:port`` — the pure-Python transport that needs nothing extra.

Serves on ``host:port`` (port 0 picks one; binds 127.0.0.1 when the host is
empty). Large batches are striped over ``options.streams`` parallel
connections per peer; bytes go straight between registered memory and the
socket (``sendall`` of memoryview slices, ``recv_into``). A write's
notification is sent after every stripe was acknowledged, so the receiver sees
it only once all data landed. Host memory only.
"""

from __future__ import annotations

import socket
import struct

from kvstore.errors import InvalidArgument, KVStoreError, TransportError
from transport.base import Capabilities, Peer, Transport, TransportOptions
from transport.handle import Handle
from transport.regions import Desc
from transport.serving import FrameServer
from transport.stripes import compose, split
from transport.tcp.client import Conn, Stripe
from transport.tcp.server import handlers
from transport.wire import NOTIFY, PING, READ, WRITE

_META = struct.Struct("<4sH")
_MAGIC = b"KVT1"


class TcpPeer(Peer):
    def __init__(self, name: str, metadata: bytes, conns: list[Conn]) -> None:
        super().__init__(name, metadata)
        self.conns = conns

    def least_loaded(self) -> Conn:
        return min(self.conns, key=lambda c: c.queued_bytes)

    def close(self) -> None:
        super().close()
        for c in self.conns:
            c.stop()


class TcpTransport(Transport):
    """See the module docstring."""

    scheme = "tcp"
    capabilities = Capabilities(same_host_only=False, zero_copy=True, device_memory=False, remote=True)

    def __init__(self, uri: str, options: TransportOptions | None = None) -> None:
        super().__init__(uri, options)
        host = self.host or "127.0.0.1"
        lsock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            lsock.bind((host, self.port))
        except OSError as e:
            lsock.close()
            raise InvalidArgument(f"tcp transport cannot bind {host}:{self.port}: {e}") from e
        lsock.listen(128)
        self.address = lsock.getsockname()[:2]
        self._server = FrameServer(lsock, handlers(self), f"tcp-server-{self.address[1]}",
                                   authorize=self.options.authorize, tls=self.options.tls_server,
                                   max_connections=self.options.max_connections)
        self._peers: list[TcpPeer] = []

    def _metadata(self) -> bytes:
        host, port = self.address
        return _META.pack(_MAGIC, port) + str(host).encode()

    def _connect(self, metadata: bytes, timeout: float) -> Peer:
        if len(metadata) < _META.size or metadata[:4] != _MAGIC:
            raise InvalidArgument("not tcp:// endpoint metadata")
        _, port = _META.unpack_from(metadata)
        host = metadata[_META.size :].decode()
        name = f"tcp://{host}:{port}"
        conns = [Conn((host, port), name, self.options.connect_timeout, self.options.token, self.options.tls_client)
                 for _ in range(self.options.streams)]
        peer = TcpPeer(name, metadata, conns)
        try:
            conns[0].connect(timeout)
        except OSError as e:
            peer.close()
            raise TransportError(f"cannot connect to {name}: {e}") from e
        except KVStoreError:  # the peer refused our token
            peer.close()
            raise
        self._peers.append(peer)
        h = Handle(f"ping {name}", 0, None)
        conns[0].put(Stripe(PING, [], h, h))
        h.wait(timeout)
        return peer

    def _post(self, op: int, peer: Peer, descs: list[Desc], h: Handle, checksum: bool,
              notify: bytes | None) -> None:
        p = _tcp(peer)
        parts = split(descs, self.options.streams, self.options.stripe_min)
        then = None
        if notify is not None:
            def then() -> None:
                s = Stripe(NOTIFY, [], h, h, aux=notify)
                h._set_abort(s.abort)
                p.least_loaded().put(s)

        data = compose(h, len(parts), then)
        stripes = [Stripe(op, part, data, h, checksum) for part in parts]

        def abort() -> None:
            for s in stripes:
                s.abort()

        h._set_abort(abort)
        used: set[int] = set()
        for s in stripes:
            free = [c for c in p.conns if id(c) not in used] or p.conns
            c = min(free, key=lambda c: c.queued_bytes)
            used.add(id(c))
            c.put(s)

    def _post_write(self, peer: Peer, descs: list[Desc], h: Handle, checksum: bool,
                    notify: bytes | None) -> None:
        self._post(WRITE, peer, descs, h, checksum, notify)

    def _post_read(self, peer: Peer, descs: list[Desc], h: Handle, checksum: bool) -> None:
        self._post(READ, peer, descs, h, checksum, None)

    def _post_notify(self, peer: Peer, msg: bytes, h: Handle) -> None:
        s = Stripe(NOTIFY, [], h, h, aux=msg)
        h._set_abort(s.abort)
        _tcp(peer).least_loaded().put(s)

    def _close(self) -> None:
        self._server.close()
        for p in self._peers:
            p.close()


def _tcp(peer: Peer) -> TcpPeer:
    if not isinstance(peer, TcpPeer):  # a peer from another transport: caller error
        raise InvalidArgument(f"peer {peer.name} was not connected by a tcp:// transport")
    return peer
