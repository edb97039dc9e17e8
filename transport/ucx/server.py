"""Serving side of ``ucx://``: one worker-level receive loop on :data:`REQ_TAG`.

Requests are parsed and bounds-checked with the same code as the socket
backends before any receive is posted into a region. A request that fails to
parse is dropped (its sender cannot be trusted to be known); one that fails
its checks is answered with an error and no byte moves. One ``ucx://``
transport per process: UCX has one worker per process here, and its request tag
is shared.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

from kvstore.checksum import checksum as xxh
from kvstore.errors import InvalidArgument, KVStoreError
from transport.base import Transport
from transport.serving import acquire_ranges, release_ranges
from transport.wire import (
    DESC,
    E_CORRUPT,
    E_INVALID,
    F_CHECKSUM,
    HEADER,
    MAX_AUX,
    MAX_COUNT,
    NOTIFY,
    OK,
    PING,
    READ,
    REPLY,
    WRITE,
    Header,
    Malformed,
    WireDesc,
    pack_header,
    parse_descs,
    parse_header,
)

log = logging.getLogger(__name__)

REQ_TAG = 0x3FFF_FFFF_FFFF_FFFF
MAX_REQ = HEADER.size + MAX_COUNT * DESC.size + MAX_AUX + 8
_U64 = struct.Struct("<Q")
_active: list[UcxServer] = []  # servers started in this process (at most one open)


def reply_tag(req_id: int) -> int:
    return (1 << 63) | req_id


def data_tag(client_id: int, seq: int) -> int:
    return (1 << 62) | (client_id << 40) | (seq & ((1 << 40) - 1))


def _reply(status: int, req: int, msg: str = "", sums: list[int] | None = None) -> bytes:
    text = msg.encode()[:4000]
    s = sums or []
    return pack_header(REPLY, status, req, len(s), len(text)) + b"".join(_U64.pack(x) for x in s) + text


class UcxServer:
    """Receive loop for one transport; runs on the ucx loop thread."""

    closed: bool

    def __init__(self, t: Transport, loop: asyncio.AbstractEventLoop) -> None:
        if any(not s.closed for s in _active):
            raise InvalidArgument("only one ucx:// transport per process (UCX worker is shared)")
        _active.append(self)
        self.t = t
        self.ucxx: Any = t.ucxx  # type: ignore[attr-defined]
        self.closed = False
        self.eps: dict[int, Any] = {}
        self._fut = asyncio.run_coroutine_threadsafe(self._serve(), loop)
        self._loop = loop

    async def _serve(self) -> None:
        buf = bytearray(MAX_REQ)
        while not self.closed:
            try:
                await self.ucxx.recv(buf, tag=REQ_TAG)
            except asyncio.CancelledError:
                return
            except Exception as e:  # noqa: BLE001 - ucxx errors (truncation...) have no common base
                log.warning("ucx server: dropped a request: %s", e)
                continue
            try:
                h = parse_header(bytes(buf[: HEADER.size]))
                descs = parse_descs(bytes(buf[HEADER.size : HEADER.size + h.n * DESC.size]), h.n)
                start = HEADER.size + h.n * DESC.size
                aux = bytes(buf[start : start + h.aux_len])
                if len(aux) < 8:
                    raise Malformed("request lacks its data tag")
            except Malformed as e:
                log.warning("ucx server: rejecting malformed request: %s", e)
                continue
            asyncio.ensure_future(self._handle(h, descs, _U64.unpack(aux[:8])[0], aux[8:]))

    async def _handle(self, h: Header, descs: list[WireDesc], base: int, aux: bytes) -> None:
        client = h.req_id >> 32
        try:
            if h.op == PING:
                addr = self.ucxx.get_ucx_address_from_buffer(aux)
                self.eps[client] = await self.ucxx.create_endpoint_from_worker_address(
                    addr, endpoint_error_handling=not h.flags & 2
                )
            ep = self.eps.get(client)
            if ep is None:
                log.warning("ucx server: request from unknown client %#x dropped", client)
                return
            tag = reply_tag(h.req_id)
            if h.op == PING:
                await ep.send(_reply(OK, h.req_id), tag=tag, force_tag=True)
            elif h.op == NOTIFY:
                self.t.notifications.deliver(aux)
                await ep.send(_reply(OK, h.req_id), tag=tag, force_tag=True)
            elif h.op in (WRITE, READ):
                try:
                    got = acquire_ranges(self.t, descs)
                except InvalidArgument as e:
                    await ep.send(_reply(E_INVALID, h.req_id, str(e)), tag=tag, force_tag=True)
                    return
                try:
                    if h.op == WRITE:
                        await self._write(ep, h, got, client, base, aux)
                    else:
                        await self._read(ep, h, got, client, base)
                finally:
                    release_ranges(self.t, got)
        except (KVStoreError, Exception) as e:  # noqa: BLE001 - a failed peer must not stop the server
            log.info("ucx server: request %#x failed: %s", h.req_id, e)

    async def _write(self, ep: Any, h: Header, got: list[tuple[Any, WireDesc]], client: int,
                     base: int, aux: bytes) -> None:
        views = [r.view[d.offset : d.offset + d.length] for r, d in got]
        recvs = [asyncio.ensure_future(self.ucxx.recv(v, tag=data_tag(client, base + i)))
                 for i, v in enumerate(views)]
        await ep.send(_reply(OK, h.req_id), tag=reply_tag(h.req_id), force_tag=True)
        await asyncio.gather(*recvs)
        bad = [i for i, (v, (_, d)) in enumerate(zip(views, got, strict=True))
               if h.flags & F_CHECKSUM and xxh(v) != d.checksum]
        if bad:
            msg = _reply(E_CORRUPT, h.req_id, f"ranges {bad[:8]} failed their checksum")
        else:
            if aux:
                self.t.notifications.deliver(aux)
            msg = _reply(OK, h.req_id)
        await ep.send(msg, tag=reply_tag(h.req_id), force_tag=True)

    async def _read(self, ep: Any, h: Header, got: list[tuple[Any, WireDesc]], client: int,
                    base: int) -> None:
        views = [r.view[d.offset : d.offset + d.length] for r, d in got]
        sums = [xxh(v) for v in views] if h.flags & F_CHECKSUM else None
        await ep.send(_reply(OK, h.req_id, sums=sums), tag=reply_tag(h.req_id), force_tag=True)
        await asyncio.gather(*(ep.send(v, tag=data_tag(client, base + i), force_tag=True)
                               for i, v in enumerate(views)))

    def close(self) -> None:
        self.closed = True
        self._loop.call_soon_threadsafe(self._fut.cancel)
