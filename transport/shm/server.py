"""Control side of ``shm://``: hands out segment descriptors, checksums, notifications.

Data never crosses this socket: peers map segments (``REGION`` returns the
memfd with ``SCM_RIGHTS``) or use cross-memory attach. ``READ`` here answers
only the ranges' checksums (for verified reads of CMA regions).
"""

from __future__ import annotations

import socket
import struct

from kvstore.checksum import checksum as xxh
from kvstore.errors import InvalidArgument
from transport.base import Transport
from transport.serving import Handler, acquire_ranges, control_handlers, release_ranges, send_reply
from transport.wire import OK, READ, REGION, REPLY, Header, WireDesc, pack_header

_U64 = struct.Struct("<Q")


def handlers(t: Transport) -> dict[int, Handler]:
    def on_region(conn: socket.socket, h: Header, descs: list[WireDesc], aux: bytes) -> bool:
        if len(descs) != 1:
            raise InvalidArgument("REGION asks for exactly one region")
        got = acquire_ranges(t, [WireDesc(descs[0].region, 0, 1, 0)])
        try:
            r = got[0][0]
            fd = r.backend[0] if isinstance(r.backend, tuple) else None
            if fd is None:
                raise InvalidArgument(f"region {r.id} is not a shared segment (use CMA)")
            socket.send_fds(conn, [pack_header(REPLY, OK, h.req_id, 1, 0) + _U64.pack(r.nbytes)], [fd])
        finally:
            release_ranges(t, got)
        return True

    def on_sums(conn: socket.socket, h: Header, descs: list[WireDesc], aux: bytes) -> bool:
        got = acquire_ranges(t, descs)
        try:
            sums = [xxh(r.view[d.offset : d.offset + d.length]) for r, d in got if r.view is not None]
        finally:
            release_ranges(t, got)
        send_reply(conn, OK, h.req_id, checksums=sums)
        return True

    return {REGION: on_region, READ: on_sums, **control_handlers(t)}
