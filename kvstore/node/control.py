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
from typing import Any, NamedTuple

import msgpack
import numpy as np

from kvstore.checksum import (
    BLOCK,
    VERIFY_BLOCK,
    combine,
    covering,
    hasher,
    nblocks,
    read_range_verified,
)
from kvstore.errors import InvalidArgument, Timeout, TransportError
from kvstore.node.protocol import (
    FLAG_ERROR,
    HEADER,
    MAX_ITEMS,
    REPLY_BIT,
    Allocated,
    Fetched,
    Op,
    SlotStatus,
    pack_frame,
    parse_header,
)
from transport.serving import ConnectionServer
from transport.wire import recv_bytes, recv_exact

log = logging.getLogger(__name__)

class Streamed(NamedTuple):
    """A handler's reply with bytes after the frame: ``tail`` is sent back to back right
    after the results, then ``done()`` runs (it releases what kept the bytes in place)."""

    results: list[Any]
    tail: list[memoryview]
    done: Callable[[], None]


class Incoming:
    """The bytes that follow a request frame (STORE), read in request order by the handler."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recv_into(self, view: memoryview) -> None:
        recv_exact(self._sock, view)

    def drain(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, BLOCK) or 1))
        while n > 0:
            take = min(n, len(scratch))
            recv_exact(self._sock, scratch[:take])
            n -= take


Handler = Callable[[Op, list[Any], Incoming], "list[Any] | Streamed"]


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
                    results = self._handler(Op(op), items, Incoming(conn))
                except (ValueError, TypeError, InvalidArgument, msgpack.UnpackException) as e:
                    # The stream can no longer be trusted: answer once, then hang up.
                    conn.sendall(pack_frame(REPLY_BIT, msgpack.packb(f"bad request: {e}"), FLAG_ERROR))
                    return
                if isinstance(results, Streamed):
                    try:
                        conn.sendall(pack_frame(op | REPLY_BIT, msgpack.packb(results.results)))
                        for view in results.tail:  # straight out of the arena
                            conn.sendall(view)
                    finally:
                        results.done()
                else:
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

    def fetch(self, requests: list[FetchRequest], timeout: float) -> list[tuple[Fetched, bool]]:
        """FETCH: one round trip; each OK value (or each of its ranges, back to back) is
        received straight into the request's ``dst`` and verified against the
        expected checksum as it lands. Per request: the reply, and whether verified
        bytes landed (``False`` for a miss, a value that does not fit ``dst``, which
        is drained and dropped, or bytes that failed verification)."""
        if timeout <= 0:
            raise Timeout(f"deadline expired before FETCH to node {self.address}")
        items = [[r.key, r.checksum] if r.ranges is None else [r.key, r.checksum, r.ranges] for r in requests]
        sock = self._take(timeout)
        deadline = time.monotonic() + timeout
        try:
            sock.settimeout(timeout)
            sock.sendall(pack_frame(Op.FETCH, msgpack.packb(items)))
            rop, flags, length = parse_header(recv_bytes(sock, HEADER.size))
            payload = _unpack(recv_bytes(sock, length))
            if flags & FLAG_ERROR:
                sock.close()
                raise InvalidArgument(f"node {self.address} refused FETCH: {payload}")
            if rop != Op.FETCH | REPLY_BIT or not isinstance(payload, list) or len(payload) != len(items):
                sock.close()
                raise TransportError(f"FETCH to node {self.address}: malformed reply")
            out = [_receive(sock, Fetched(*reply), r, deadline) for reply, r in zip(payload, requests, strict=True)]
        except TimeoutError as e:
            sock.close()
            raise Timeout(f"FETCH to node {self.address} timed out after {timeout:.1f}s") from e
        except (OSError, ConnectionError, ValueError, TypeError, TransportError) as e:
            sock.close()
            raise TransportError(f"FETCH to node {self.address}: {e}") from e
        with self._lock:
            self._idle.append(sock)
        return out

    def store(self, requests: list[StoreRequest], timeout: float) -> list[Allocated]:
        """STORE: one round trip; the request frame is followed by each value's bytes, sent
        straight from the caller's buffers. Per request: the node's result (OK: committed
        at ``offset`` with ``generation``; NO_SPACE, CORRUPT, INVALID)."""
        if timeout <= 0:
            raise Timeout(f"deadline expired before STORE to node {self.address}")
        sock = self._take(timeout)
        try:
            sock.settimeout(timeout)
            sock.sendall(pack_frame(Op.STORE, msgpack.packb([[r.key, len(r.value), r.checksum] for r in requests])))
            for r in requests:
                sock.sendall(r.value)
            rop, flags, length = parse_header(recv_bytes(sock, HEADER.size))
            payload = _unpack(recv_bytes(sock, length))
        except TimeoutError as e:
            sock.close()
            raise Timeout(f"STORE to node {self.address} timed out after {timeout:.1f}s") from e
        except (OSError, ConnectionError, ValueError, TransportError) as e:
            sock.close()
            raise TransportError(f"STORE to node {self.address}: {e}") from e
        if flags & FLAG_ERROR:
            sock.close()
            raise InvalidArgument(f"node {self.address} refused STORE: {payload}")
        if rop != Op.STORE | REPLY_BIT or not isinstance(payload, list) or len(payload) != len(requests):
            sock.close()
            raise TransportError(f"STORE to node {self.address}: malformed reply")
        with self._lock:
            self._idle.append(sock)
        return [Allocated(*r) for r in payload]

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


class StoreRequest(NamedTuple):
    """One value to STORE: its key, its checksum, its bytes."""

    key: bytes
    checksum: int
    value: memoryview


class FetchRequest(NamedTuple):
    """One value to FETCH: its key, the checksum it must have, where it lands (the whole
    value, or its ``ranges`` back to back)."""

    key: bytes
    checksum: int
    dst: memoryview | None
    ranges: list[tuple[int, int]] | None = None


def _receive(sock: socket.socket, f: Fetched, r: FetchRequest, deadline: float) -> tuple[Fetched, bool]:
    """Take one reply's bytes off the stream; whether they landed verified in ``r.dst``."""
    if f.status != SlotStatus.OK:
        return f, False
    spans = [(0, f.size)] if r.ranges is None else \
        [(b.start * BLOCK, min(b.stop * BLOCK, f.size)) for off, n in r.ranges for b in [covering(off, n)]]
    want = f.size if r.ranges is None else sum(n for _, n in r.ranges)
    if r.dst is None or len(r.dst) != want:
        for lo, hi in spans:
            _drain(sock, memoryview(bytearray(min(hi - lo, BLOCK))), hi - lo, deadline)
        return f, False
    if r.ranges is None:
        return f, _recv_hashed(sock, r.dst, f.size, r.key, deadline) == r.checksum
    sums = np.frombuffer(f.sums, dtype="<u8")
    trusted = len(sums) == nblocks(f.size) and combine(sums, r.key) == r.checksum
    scratch = memoryview(bytearray(BLOCK))

    def land(_pos: int, view: memoryview) -> None:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        recv_exact(sock, view)

    def peek(_pos: int, n: int) -> memoryview:
        land(_pos, scratch[:n])
        return scratch[:n]

    ok, at = trusted, 0
    for off, n in r.ranges:
        ok = read_range_verified(r.key, sums if trusted else np.zeros(nblocks(f.size), np.uint64), f.size, off,
                                 r.dst[at:at + n], land, peek) and ok
        at += n
    return f, ok


def _recv_hashed(sock: socket.socket, dst: memoryview, size: int, key: bytes, deadline: float) -> int:
    """Receive ``size`` bytes into ``dst``, hashing each block while it is in cache."""
    h = hasher(key)
    for off in range(0, size, VERIFY_BLOCK):
        block = dst[off : min(off + VERIFY_BLOCK, size)]
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        recv_exact(sock, block)
        h.update(block)
    return int(h.intdigest())


def _drain(sock: socket.socket, scratch: memoryview, size: int, deadline: float) -> None:
    """Read and drop ``size`` bytes (a value that does not fit where it was meant to go)."""
    for off in range(0, size, len(scratch)):
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        recv_exact(sock, scratch[: min(len(scratch), size - off)])
