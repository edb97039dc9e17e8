"""The data-plane wire format: fixed, versioned little-endian binary frames (no pickle).

Every message starts with a 24-byte :data:`HEADER`::

    magic  "KVTP"     4 B
    version           u8   (VERSION; other versions are rejected)
    op                u8   (WRITE, READ, NOTIFY, REGION, PING, REPLY)
    flags             u16  (F_CHECKSUM on requests; the status code on REPLY)
    req_id            u64  (echoed in the reply)
    count             u32  descriptors that follow (REPLY: u64 checksums that follow)
    aux_len           u32  bytes of aux data after the descriptors (notify text, error text)

then ``count`` 28-byte :data:`DESC` records ``(region u32, offset u64, length u64,
checksum u64)``, then ``aux_len`` bytes, then (WRITE requests, READ replies) the
ranges' bytes in descriptor order. Servers parse and bounds-check the whole
header and every descriptor against their registrations *before* touching
memory; anything malformed or oversize ends that connection only.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any, NamedTuple

from kvstore import errors
from kvstore.errors import InvalidArgument, KVStoreError, Timeout, TransportError

MAGIC = b"KVTP"
VERSION = 1
HEADER = struct.Struct("<4sBBHQII")
DESC = struct.Struct("<IQQQ")

WRITE, READ, NOTIFY, REGION, PING, AUTH, REPLY = 1, 2, 3, 4, 5, 6, 0x81
OPS = frozenset({WRITE, READ, NOTIFY, REGION, PING, AUTH, REPLY})
F_CHECKSUM = 1

OK, E_INVALID, E_CORRUPT, E_MALFORMED, E_INTERNAL, E_DENIED = 0, 1, 2, 3, 4, 5
STATUS_NAMES = {OK: "OK", E_INVALID: "INVALID", E_CORRUPT: "CORRUPT", E_MALFORMED: "MALFORMED",
                E_INTERNAL: "INTERNAL", E_DENIED: "DENIED"}
"""Reply status -> its name in :data:`kvstore.errors.STATUS_ERRORS`."""
MAX_COUNT = 65536
MAX_AUX = 64 * 1024


class Malformed(InvalidArgument):
    """A frame failed to parse (bad magic, version, op or sizes)."""


class Header(NamedTuple):
    op: int
    flags: int
    req_id: int
    n: int
    aux_len: int


class WireDesc(NamedTuple):
    region: int
    offset: int
    length: int
    checksum: int


def pack_header(op: int, flags: int, req_id: int, count: int, aux_len: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, op, flags, req_id, count, aux_len)


def parse_header(data: bytes | memoryview) -> Header:
    """Parse and size-check a header; raises :class:`Malformed`."""
    if len(data) != HEADER.size:
        raise Malformed(f"header is {len(data)} B, expected {HEADER.size}")
    magic, ver, op, flags, req_id, count, aux_len = HEADER.unpack(data)
    if magic != MAGIC:
        raise Malformed(f"bad magic {bytes(magic)!r}")
    if ver != VERSION:
        raise Malformed(f"unsupported wire version {ver} (this side speaks {VERSION})")
    if op not in OPS:
        raise Malformed(f"unknown op {op}")
    if count > MAX_COUNT:
        raise Malformed(f"{count} descriptors exceed the limit of {MAX_COUNT}")
    if aux_len > MAX_AUX:
        raise Malformed(f"aux data of {aux_len} B exceeds the limit of {MAX_AUX}")
    return Header(op, flags, req_id, count, aux_len)


def pack_descs(descs: list[WireDesc]) -> bytes:
    return b"".join(DESC.pack(*d) for d in descs)


def parse_descs(data: bytes | memoryview, count: int) -> list[WireDesc]:
    return [WireDesc(*DESC.unpack_from(data, i * DESC.size)) for i in range(count)]


def status_error(status: int, msg: str) -> KVStoreError:
    """Map a non-OK REPLY status to the error tree (:data:`kvstore.errors.STATUS_ERRORS`)."""
    return errors.status_error(STATUS_NAMES.get(status, "INTERNAL"), msg) or TransportError(msg)


def settimeout(sock: socket.socket, deadline: float | None) -> None:
    """Bound the next socket calls by ``deadline`` (monotonic); Timeout if already past."""
    if deadline is None:
        sock.settimeout(None)
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise Timeout("deadline expired")
    sock.settimeout(left)


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (straight into it, no copy). EOF -> TransportError."""
    pos, n = 0, len(view)
    while pos < n:
        got = sock.recv_into(view[pos:], n - pos)
        if got == 0:
            raise TransportError(f"peer closed the connection after {pos} of {n} B")
        pos += got


def recv_within(sock: socket.socket, n: int, deadline: float) -> bytes:
    """``n`` bytes that must all arrive before ``deadline`` (monotonic), however they are
    dripped: TimeoutError (an OSError) otherwise. For request frames of untrusted peers."""
    buf = bytearray(n)
    view, pos = memoryview(buf), 0
    while pos < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{pos} of {n} B arrived in time")
        sock.settimeout(left)
        got = sock.recv_into(view[pos:], n - pos)
        if got == 0:
            raise TransportError(f"peer closed the connection after {pos} of {n} B")
        pos += got
    return bytes(buf)


def recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    if n:
        recv_exact(sock, memoryview(buf))
    return bytes(buf)


def connect_tcp(addr: tuple[str, int], timeout: float) -> socket.socket:
    """A blocking TCP connection with Nagle off (request/reply channels). Raises OSError."""
    sock = socket.create_connection(addr, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def connect_tcp_async(addr: tuple[str, int], timeout: float) -> socket.socket:
    """:func:`connect_tcp` for asyncio: a non-blocking socket for ``loop.sock_*`` calls.
    Raises OSError or TimeoutError."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def recv_exact_async(sock: socket.socket, view: memoryview) -> None:
    """:func:`recv_exact` on a non-blocking socket, straight into ``view``."""
    loop = asyncio.get_running_loop()
    pos, n = 0, len(view)
    while pos < n:
        got = await loop.sock_recv_into(sock, view[pos:])
        if got == 0:
            raise TransportError(f"peer closed the connection after {pos} of {n} B")
        pos += got


async def recv_bytes_async(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    if n:
        await recv_exact_async(sock, memoryview(buf))
    return bytes(buf)


class AsyncStream:
    """One connection of an asyncio client: a raw non-blocking socket (``loop.sock_*``:
    bytes received straight into the caller's buffers) or, with TLS, asyncio streams
    (one copy out of the TLS layer). Use from one event loop."""

    def __init__(self, sock: socket.socket | None = None, reader: asyncio.StreamReader | None = None,
                 writer: asyncio.StreamWriter | None = None) -> None:
        self._sock, self._reader, self._writer = sock, reader, writer

    @classmethod
    async def open(cls, addr: tuple[str, int], timeout: float, tls: Any = None) -> AsyncStream:
        """Connect (TLS with ``tls``, an ``ssl.SSLContext`` that checks the host name).
        Raises OSError or TimeoutError."""
        if tls is None:
            return cls(sock=await connect_tcp_async(addr, timeout))
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(addr[0], addr[1], ssl=tls, server_hostname=addr[0])
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader=reader, writer=writer)

    async def sendall(self, data: bytes | memoryview) -> None:
        if self._sock is not None:
            await asyncio.get_running_loop().sock_sendall(self._sock, data)
            return
        assert self._writer is not None
        self._writer.write(data)
        await self._writer.drain()

    async def recv_into(self, view: memoryview) -> None:
        """Fill ``view`` exactly. EOF -> TransportError."""
        if self._sock is not None:
            await recv_exact_async(self._sock, view)
            return
        assert self._reader is not None
        try:
            view[:] = await self._reader.readexactly(len(view))
        except asyncio.IncompleteReadError as e:
            raise TransportError(f"peer closed the connection after {len(e.partial)} of {len(view)} B") from e

    async def recv_bytes(self, n: int) -> bytes:
        buf = bytearray(n)
        if n:
            await self.recv_into(memoryview(buf))
        return bytes(buf)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._writer is not None:
            self._writer.close()
