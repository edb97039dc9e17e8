"""Client side of ``tcp://``: per-peer connection pool, one worker thread per connection.

A batch is split into stripes (:func:`transport.stripes.split`) put on the
least-loaded connections. Each worker sends a stripe as one frame (header,
descriptor table, then the source ranges straight from registered memory with
``sendall``) or receives a READ reply straight into the destination ranges with
``recv_into``: no per-message copies. Any socket error closes that connection
(it reconnects on next use) and fails the stripe; cancellation and deadline
expiry shut the socket down, so a worker never blocks past them.
"""

from __future__ import annotations

import itertools
import queue
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kvstore.checksum import checksum as xxh
from kvstore.errors import Corruption, KVStoreError, Timeout, TransportError
from transport.handle import Handle
from transport.regions import Desc
from transport.wire import (
    AUTH,
    F_CHECKSUM,
    HEADER,
    OK,
    READ,
    WRITE,
    WireDesc,
    pack_descs,
    pack_header,
    parse_header,
    recv_bytes,
    recv_exact,
    settimeout,
    status_error,
)

_U64 = struct.Struct("<Q")
QUEUED, RUNNING, ENDED = 0, 1, 2


@dataclass(eq=False)
class Stripe:
    """One frame's worth of work, reported to ``report`` exactly once."""

    op: int
    descs: list[Desc]
    report: Handle
    owner: Handle
    checksum: bool = False
    aux: bytes = b""
    state: int = QUEUED
    conn: Conn | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def nbytes(self) -> int:
        return sum(d.length for d in self.descs)

    def abort(self) -> None:
        with self.lock:
            if self.state == QUEUED:
                self.state = ENDED
                self.report._part_done(None)
                return
            conn = self.conn if self.state == RUNNING else None
        if conn is not None:
            conn.kill()


class Conn:
    """One TCP connection and the worker thread that owns it."""

    def __init__(self, addr: tuple[str, int], name: str, connect_timeout: float,
                 token: bytes | None = None, tls: Any = None) -> None:
        self.addr = addr
        self.name = name
        self.connect_timeout = connect_timeout
        self.token = token
        self.tls = tls
        self.queued_bytes = 0
        self._q: queue.SimpleQueue[Stripe | None] = queue.SimpleQueue()
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"tcp-{name}", daemon=True)
        self._thread.start()

    def put(self, s: Stripe) -> None:
        with self._lock:
            self.queued_bytes += s.nbytes
        self._q.put(s)

    def stop(self) -> None:
        self._q.put(None)
        self.kill()

    def kill(self) -> None:
        """Break the connection under a running stripe (from any thread)."""
        with self._lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already down: the worker sees the error on its own

    def connect(self, timeout: float) -> None:
        sock = socket.create_connection(self.addr, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=self.addr[0])
            except BaseException:
                sock.close()
                raise
        if self.token is not None:  # a peer that requires a token gets it before anything else
            try:
                sock.sendall(pack_header(AUTH, 0, 0, 0, len(self.token)) + self.token)
                h = parse_header(recv_bytes(sock, HEADER.size))
                msg = recv_bytes(sock, h.aux_len + 8 * h.n)[8 * h.n:].decode(errors="replace")
            except BaseException:
                sock.close()
                raise
            if h.flags != OK:
                sock.close()
                raise status_error(h.flags, f"{self.name} refused this transport's token: {msg}")
        with self._lock:
            self._sock = sock

    def _drop(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _run(self) -> None:
        while True:
            s = self._q.get()
            if s is None:
                self._drop()
                return
            with self._lock:
                self.queued_bytes -= s.nbytes
            with s.lock:
                if s.state != QUEUED:
                    continue
                if s.owner.aborted:
                    s.state = ENDED
                    s.report._part_done(None)
                    continue
                s.state, s.conn = RUNNING, self
            err: BaseException | None = None
            try:
                self._do(s)
            except KVStoreError as e:
                err = e
            except TimeoutError as e:
                err = Timeout(f"{s.owner.what}: {e}")
            except OSError as e:
                # A connect cut short by the operation's own deadline is a timeout, not a lost peer.
                if s.owner.deadline is not None and time.monotonic() >= s.owner.deadline - 1e-3:
                    err = Timeout(f"{s.owner.what}: deadline expired ({e})")
                else:
                    err = TransportError(f"{s.owner.what}: connection to {self.name} failed: {e}")
            if err is not None:
                self._drop()
            with s.lock:
                s.state = ENDED
            s.report._part_done(err)

    def _do(self, s: Stripe) -> None:
        if self._sock is None:
            left = s.owner.remaining()
            self.connect(self.connect_timeout if left is None else min(left, self.connect_timeout))
        sock = self._sock
        assert sock is not None
        settimeout(sock, s.owner.deadline)
        req = next(self._ids)
        flags = F_CHECKSUM if s.checksum else 0
        if s.op == WRITE:
            wd = [
                WireDesc(d.remote.region_id, d.remote_offset, d.length,
                         xxh(_src(d)) if s.checksum else 0)
                for d in s.descs
            ]
        else:
            wd = [WireDesc(d.remote.region_id, d.remote_offset, d.length, 0) for d in s.descs]
        sock.sendall(pack_header(s.op, flags, req, len(wd), len(s.aux)) + pack_descs(wd) + s.aux)
        if s.op == WRITE:
            for d in s.descs:
                sock.sendall(_src(d))
        h = parse_header(recv_bytes(sock, HEADER.size))
        sums = [_U64.unpack(recv_bytes(sock, 8))[0] for _ in range(h.n)]
        msg = recv_bytes(sock, h.aux_len).decode(errors="replace")
        if h.req_id != req and h.req_id != 0:
            raise TransportError(f"{self.name}: reply to request {h.req_id}, expected {req}")
        if h.flags != OK:
            raise status_error(h.flags, f"{self.name} refused {s.owner.what}: {msg}")
        if s.op == READ:
            for i, d in enumerate(s.descs):
                dst = _dst(d)
                recv_exact(sock, dst)
                if s.checksum and (i >= len(sums) or xxh(dst) != sums[i]):
                    raise Corruption(f"{s.owner.what}: range {i} failed its checksum on arrival")


def _src(d: Desc) -> memoryview:
    assert d.local.view is not None
    return d.local.view[d.local_offset : d.local_offset + d.length]


def _dst(d: Desc) -> memoryview:
    return _src(d)

