"""The node control channel: a threaded server in the node, pooled connections in clients.

Measured on loopback here: a request/response round trip takes ~0.09 ms over
this channel against ~0.7 ms through gRPC's Python stack, and every get and put
makes two of them (docs/design/node-control.md).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack

from kvstore.errors import InvalidArgument, Timeout, TransportError
from kvstore.node.protocol import (
    FLAG_ERROR,
    HEADER,
    MAX_ITEMS,
    REPLY_BIT,
    Op,
    pack_frame,
    parse_header,
)
from transport.serving import ConnectionServer
from transport.wire import recv_bytes

log = logging.getLogger(__name__)

Handler = Callable[[Op, list[Any]], list[Any]]


def _unpack(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, max_array_len=MAX_ITEMS * 4, max_map_len=0,
                           max_str_len=1 << 16, max_bin_len=1 << 16, strict_map_key=True)


class ControlServer:
    """Serves ``handler(op, items) -> results`` on ``host:port``, one thread per connection."""

    def __init__(self, host: str, port: int, handler: Handler) -> None:
        self._handler = handler
        lsock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((host, port))
        lsock.listen(128)
        self.address = f"{host}:{lsock.getsockname()[1]}"
        self._server = ConnectionServer(lsock, self._serve, "node-control")

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                try:
                    op, _flags, length = parse_header(recv_bytes(conn, HEADER.size))
                    items = _unpack(recv_bytes(conn, length))
                    if not isinstance(items, list) or len(items) > MAX_ITEMS:
                        raise ValueError(f"payload must be a list of at most {MAX_ITEMS} items")
                    results = self._handler(Op(op), items)
                except (ValueError, TypeError, InvalidArgument, msgpack.UnpackException) as e:
                    # The stream can no longer be trusted: answer once, then hang up.
                    conn.sendall(pack_frame(REPLY_BIT, msgpack.packb(f"bad request: {e}"), FLAG_ERROR))
                    return
                conn.sendall(pack_frame(op | REPLY_BIT, msgpack.packb(results)))
        except (ConnectionError, OSError, TransportError):  # the client went away
            return

    def close(self) -> None:
        self._server.close()


class ControlClient:
    """Calls a node's control server. Thread-safe: a pool of connections, one call each."""

    def __init__(self, address: str, connect_timeout: float = 5.0) -> None:
        host, _, port = address.rpartition(":")
        self._addr = (host.strip("[]"), int(port))
        self.address = address
        self._connect_timeout = connect_timeout
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def call(self, op: Op, items: list[Any], timeout: float) -> list[Any]:
        """Send one batch and wait for its results; raises TransportError/Timeout."""
        if timeout <= 0:
            raise Timeout(f"deadline expired before {op.name} to node {self.address}")
        sock = self._take(timeout)
        deadline = time.monotonic() + timeout
        try:
            sock.settimeout(timeout)
            sock.sendall(pack_frame(op, msgpack.packb(items)))
            rop, flags, length = parse_header(recv_bytes(sock, HEADER.size))
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            payload = _unpack(recv_bytes(sock, length))
        except TimeoutError as e:
            sock.close()
            raise Timeout(f"{op.name} to node {self.address} timed out after {timeout:.1f}s") from e
        except (OSError, ConnectionError, ValueError, TransportError) as e:
            sock.close()
            raise TransportError(f"{op.name} to node {self.address}: {e}") from e
        if flags & FLAG_ERROR:
            sock.close()
            raise InvalidArgument(f"node {self.address} refused {op.name}: {payload}")
        if rop != op | REPLY_BIT or not isinstance(payload, list) or len(payload) != len(items):
            sock.close()
            raise TransportError(f"{op.name} to node {self.address}: malformed reply")
        with self._lock:
            self._idle.append(sock)
        return payload

    def _take(self, timeout: float) -> socket.socket:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        try:
            sock = socket.create_connection(self._addr, timeout=min(timeout, self._connect_timeout))
        except OSError as e:
            raise TransportError(f"cannot reach node control {self.address}: {e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()
