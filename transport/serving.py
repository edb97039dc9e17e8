"""Serving side of the socket backends: one thread per connection, frames in, replies out.

:class:`FrameServer` accepts connections on a listening socket and runs
:func:`serve_connection` for each. A malformed or oversize frame, an unknown
op or a descriptor that fails its bounds check is answered with an error
reply; the connection is then closed when its stream can no longer be trusted
(a WRITE's payload would follow). Other connections and new ones are served
as before. Descriptors are checked against the registration *before* any byte
of the target region is written.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from kvstore.errors import InvalidArgument, KVStoreError
from transport.base import Transport
from transport.regions import Region
from transport.wire import (
    AUTH,
    E_DENIED,
    E_INVALID,
    E_MALFORMED,
    HEADER,
    NOTIFY,
    OK,
    PING,
    REPLY,
    Header,
    Malformed,
    WireDesc,
    pack_header,
    parse_descs,
    parse_header,
    recv_bytes,
    recv_exact,
)

log = logging.getLogger(__name__)

# handler(conn, header, descs, aux) -> keep the connection open?
Handler = Callable[[socket.socket, Header, list[WireDesc], bytes], bool]
_U64 = struct.Struct("<Q")
MAX_TOKEN = 1024


def send_reply(
    conn: socket.socket, status: int, req_id: int, msg: str = "", checksums: list[int] | None = None
) -> None:
    text = msg.encode()[:4096]
    sums = checksums or []
    conn.sendall(
        pack_header(REPLY, status, req_id, len(sums), len(text))
        + b"".join(_U64.pack(c) for c in sums)
        + text
    )


def acquire_ranges(t: Transport, descs: list[WireDesc]) -> list[tuple[Region, WireDesc]]:
    """Pin each descriptor's region and bounds-check it; raises InvalidArgument (nothing pinned)."""
    got: list[tuple[Region, WireDesc]] = []
    try:
        for i, d in enumerate(descs):
            r = t._acquire(d.region)
            if r is None:
                raise InvalidArgument(f"descriptor {i}: region {d.region} is not registered")
            got.append((r, d))
            if r.view is None:
                raise InvalidArgument(f"descriptor {i}: region {d.region} is not host memory")
            if d.length == 0 or d.offset + d.length > r.nbytes:
                raise InvalidArgument(
                    f"descriptor {i}: range {d.offset}+{d.length} outside region {d.region} "
                    f"of {r.nbytes} B"
                )
    except InvalidArgument:
        release_ranges(t, got)
        raise
    return got


def release_ranges(t: Transport, got: list[tuple[Region, WireDesc]]) -> None:
    for r, _ in got:
        t._release(r.id)


def serve_connection(conn: socket.socket, handlers: dict[int, Handler], who: str,
                     authorize: Callable[[bytes | None], bool] | None = None,
                     idle: Callable[[socket.socket, bool], None] | None = None) -> None:
    """Serve frames on ``conn`` until EOF, an error, or a handler asks to close. With
    ``authorize``, the first frame must be an AUTH whose token (its aux bytes) passes it;
    anything else, or a refused token, is answered DENIED and the connection closed.
    ``idle(conn, waiting)`` marks the connection idle while it waits for a frame (a
    :class:`ConnectionServer` at its cap may then evict it for a new peer)."""
    hdr = bytearray(HEADER.size)
    authed = authorize is None
    try:
        while True:
            if idle is not None:  # unauthenticated ones too: a flood of them is what gets evicted
                idle(conn, True)
            try:
                got = conn.recv_into(hdr, HEADER.size)
            except OSError:
                return
            if idle is not None:
                idle(conn, False)
            if got == 0:
                return
            if got < HEADER.size:
                recv_exact(conn, memoryview(hdr)[got:])
            try:
                h = parse_header(bytes(hdr))
            except Malformed as e:
                log.warning("%s: rejecting malformed frame: %s", who, e)
                send_reply(conn, E_MALFORMED, 0, str(e))
                return
            if not authed or h.op == AUTH:
                if h.op != AUTH or h.n or h.aux_len > MAX_TOKEN:
                    log.warning("%s: refused a peer that did not authenticate first", who)
                    send_reply(conn, E_DENIED, h.req_id, "authenticate first: this endpoint requires a token")
                    return
                token = recv_bytes(conn, h.aux_len)
                if authorize is not None and not authorize(token):
                    log.warning("%s: refused a peer's token", who)
                    send_reply(conn, E_DENIED, h.req_id, "token refused")
                    return
                authed = True
                send_reply(conn, OK, h.req_id)
                continue
            descs = parse_descs(recv_bytes(conn, h.n * 28), h.n)
            aux = recv_bytes(conn, h.aux_len)
            handler = handlers.get(h.op)
            if handler is None:
                send_reply(conn, E_MALFORMED, h.req_id, f"op {h.op} not served here")
                return
            try:
                keep = handler(conn, h, descs, aux)
            except InvalidArgument as e:
                log.info("%s: rejected request %d: %s", who, h.req_id, e)
                send_reply(conn, E_INVALID, h.req_id, str(e))
                keep = False
            if not keep:
                return
    except (OSError, KVStoreError) as e:
        log.debug("%s: connection ended: %s", who, e)
    finally:
        conn.close()


class ConnectionServer:
    """Accept loop over a bound, listening socket; ``serve(conn)`` on a daemon thread per
    connection, at most ``max_connections`` at once. At the cap, a new connection takes
    the place of the one idle longest (its server marks it with :meth:`idle`), so peers
    that hold connections open without using them cannot lock others out; with none
    idle, the new connection is closed (logged). ``close()`` wakes the accept loop and
    shuts every open connection."""

    def __init__(self, listener: socket.socket, serve: Callable[[socket.socket], None], who: str, *,
                 max_connections: int = 4096, tls: Any = None, handshake_timeout: float = 10.0) -> None:
        self._listener = listener
        self._serve_conn = serve
        self._who = who
        self._tls = tls  # ssl.SSLContext: every accepted connection is wrapped before serve() sees it
        self._handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.rejected = 0
        self.evicted = 0
        self._idle_since: dict[socket.socket, float] = {}
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name=f"{who}-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                full = len(self._conns) >= self.max_connections
                victim = min(self._idle_since, key=self._idle_since.__getitem__) if full and self._idle_since \
                    else None
                if victim is not None:
                    del self._idle_since[victim]
                    self._conns.discard(victim)
                    self.evicted += 1
                    full = False
                if not full:
                    self._conns.add(conn)
            if victim is not None:
                try:
                    victim.shutdown(socket.SHUT_RDWR)  # its thread ends on the error
                except OSError:
                    log.debug("%s: evicted connection already shut", self._who)
            if full:
                self.rejected += 1
                if self.rejected in (1, 10, 100) or self.rejected % 1000 == 0:
                    log.warning("%s: %d connections open (the cap); refused %d so far", self._who,
                                self.max_connections, self.rejected)
                conn.close()
                continue
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), name=f"{self._who}-conn", daemon=True).start()

    def idle(self, conn: socket.socket, idle: bool) -> None:
        """``conn`` waits for its next request (``True``) or is serving one (``False``)."""
        with self._lock:
            if idle and conn in self._conns:
                self._idle_since[conn] = time.monotonic()
            else:
                self._idle_since.pop(conn, None)

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self._tls is not None:
                try:
                    conn = self._handshake(conn)
                except OSError as e:  # not TLS, or a failed handshake
                    log.debug("%s: TLS handshake failed: %s", self._who, e)
                    return
            self._serve_conn(conn)
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._idle_since.pop(conn, None)
            conn.close()

    def _handshake(self, raw: socket.socket) -> socket.socket:
        """Wrap an accepted connection in TLS (bounded in time) and track the wrapped one."""
        raw.settimeout(self._handshake_timeout)
        try:
            secure: socket.socket = self._tls.wrap_socket(raw, server_side=True)
        except OSError:
            with self._lock:
                self._conns.discard(raw)
            raise
        secure.settimeout(None)
        with self._lock:
            if raw in self._conns:
                self._conns.discard(raw)
                self._conns.add(secure)
        return secure

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            log.debug("%s: listener already shut", self._who)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                log.debug("%s: connection already shut", self._who)
        self._thread.join(timeout=5)


class FrameServer(ConnectionServer):
    """A :class:`ConnectionServer` speaking the data-plane frames to ``handlers`` (peers
    authenticate first when ``authorize`` is given; TLS with ``tls``)."""

    def __init__(self, listener: socket.socket, handlers: dict[int, Handler], who: str,
                 authorize: Callable[[bytes | None], bool] | None = None,
                 admit: Callable[[socket.socket], str | None] | None = None, tls: Any = None,
                 max_connections: int = 4096) -> None:
        def serve(conn: socket.socket) -> None:
            refusal = admit(conn) if admit is not None else None
            if refusal is not None:
                log.warning("%s: refused a peer: %s", who, refusal)
                send_reply(conn, E_DENIED, 0, refusal)
                return
            serve_connection(conn, handlers, who, authorize, self.idle)

        super().__init__(listener, serve, who, tls=tls, max_connections=max_connections)


def control_handlers(t: Transport) -> dict[int, Handler]:
    """NOTIFY and PING, served the same way by every socket backend."""

    def on_notify(conn: socket.socket, h: Header, descs: list[WireDesc], aux: bytes) -> bool:
        t.notifications.deliver(aux)
        send_reply(conn, OK, h.req_id)
        return True

    def on_ping(conn: socket.socket, h: Header, descs: list[WireDesc], aux: bytes) -> bool:
        send_reply(conn, OK, h.req_id)
        return True

    return {NOTIFY: on_notify, PING: on_ping}
