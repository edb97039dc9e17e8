"""Serving side of ``tcp://``: WRITE lands straight in registered memory via ``recv_into``.

Handlers run on the connection's thread (see :mod:`transport.serving`). A WRITE
is bounds-checked in full before its payload is read; a failed checksum is
reported as Corruption (the bytes did land: the writer must not publish them).
A notification attached to a frame is delivered only after the frame's data landed.
"""

from __future__ import annotations

import socket
import struct

from kvstore.checksum import checksum as xxh
from transport.base import Transport
from transport.serving import Handler, acquire_ranges, control_handlers, release_ranges, send_reply
from transport.wire import (
    E_CORRUPT,
    F_CHECKSUM,
    OK,
    READ,
    WRITE,
    Header,
    WireDesc,
    recv_exact,
)

_U64 = struct.Struct("<Q")


def handlers(t: Transport) -> dict[int, Handler]:
    def on_write(conn: socket.socket, h: Header, descs: list[WireDesc], aux: bytes) -> bool:
        got = acquire_ranges(t, descs)
        bad: list[int] = []
        try:
            for i, (r, d) in enumerate(got):
                assert r.view is not None
                dst = r.view[d.offset : d.offset + d.length]
                recv_exact(conn, dst)
                if h.flags & F_CHECKSUM and xxh(dst) != d.checksum:
                    bad.append(i)
        finally:
            release_ranges(t, got)
        if bad:
            send_reply(conn, E_CORRUPT, h.req_id, f"ranges {bad[:8]} failed their checksum")
            return True
        if aux:
            t.notifications.deliver(aux)
        send_reply(conn, OK, h.req_id)
        return True

    def on_read(conn: socket.socket, h: Header, descs: list[WireDesc], aux: bytes) -> bool:
        got = acquire_ranges(t, descs)
        try:
            views = [r.view[d.offset : d.offset + d.length] for r, d in got if r.view is not None]
            sums = [xxh(v) for v in views] if h.flags & F_CHECKSUM else None
            send_reply(conn, OK, h.req_id, checksums=sums)
            for v in views:
                conn.sendall(v)
        finally:
            release_ranges(t, got)
        return True

    return {WRITE: on_write, READ: on_read, **control_handlers(t)}
