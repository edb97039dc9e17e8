"""``ucx://`` — transfers over UCX (ucxx): shared memory/CMA, TCP, RDMA, cuda_ipc as UCX finds.

Peers connect by UCX *worker address* (the endpoint metadata), which lets UCX
pick shared memory or CMA for same-host peers (the listener path always falls
back to TCP) and TCP/RDMA for remote ones; ``UCX_TLS`` narrows the choice.
Every message uses explicit 64-bit tags:

* requests go to the peer's worker on :data:`REQ_TAG`, framed exactly like
  :mod:`transport.wire` (the first 8 aux bytes carry the request's base data tag);
* replies come back on ``REPLY | req_id``; ``req_id = client_id << 32 | seq``;
* each range moves as one tagged message ``DATA | client_id << 40 | seq`` straight
  between registered buffers (UCX's rendezvous protocol: zero-copy for large ranges).

A WRITE is answered twice: "accepted" after the server checked every
descriptor and posted receives straight into its regions (the client sends
no byte before), then "done" after every range landed (and its checksum
matched). A READ's ranges follow its "accepted" reply. Device (CUDA) buffers
can be registered and are handed to UCX as they are.
"""

from __future__ import annotations

import asyncio
import os
import struct
from concurrent.futures import Future
from typing import Any

from kvstore.checksum import checksum as xxh
from kvstore.errors import Corruption, InvalidArgument, KVStoreError, TransportError
from transport.base import Capabilities, Peer, Transport, TransportOptions
from transport.handle import Handle
from transport.regions import Desc
from transport.ucx.loop import ensure, ucxx_module
from transport.ucx.server import REQ_TAG, UcxServer, data_tag, reply_tag
from transport.wire import (
    F_CHECKSUM,
    HEADER,
    NOTIFY,
    OK,
    PING,
    READ,
    WRITE,
    WireDesc,
    pack_descs,
    pack_header,
    parse_header,
    status_error,
)

_META = struct.Struct("<4sI")
_MAGIC = b"KVU1"
_U64 = struct.Struct("<Q")
F_NO_ERRH = 2  # PING flag: create the reverse endpoint without peer error handling


class UcxPeer(Peer):
    def __init__(self, name: str, metadata: bytes, ep: Any, client_id: int) -> None:
        super().__init__(name, metadata)
        self.ep = ep
        self.client_id = client_id
        self.seq = 0
        self.data_seq = 0
        self.dead = False
        self.tasks: set[asyncio.Task[None]] = set()

    def on_close(self) -> None:
        """UCX reported the endpoint failed: fail everything in flight (loop thread)."""
        self.dead = True
        for t in list(self.tasks):
            t.cancel()


class UcxTransport(Transport):
    """See the module docstring."""

    scheme = "ucx"
    capabilities = Capabilities(same_host_only=False, zero_copy=True, device_memory=True, remote=True)

    def __init__(self, uri: str, options: TransportOptions | None = None) -> None:
        super().__init__(uri, options)
        self.ucxx = ucxx_module()
        self.loop = ensure()
        self.error_handling = self.options.params.get("error_handling", "1") != "0"
        """False (``?error_handling=0``) lets UCX use shared memory between same-host
        peers, which UCX's peer-failure mode excludes; a killed peer is then only
        noticed through deadlines."""
        self._server = UcxServer(self, self.loop)
        self._addr: bytes = self._run(self._address())
        self._peers: list[UcxPeer] = []

    async def _address(self) -> bytes:
        return bytes(self.ucxx.get_worker_address().tobytes())

    def _run(self, coro: Any, timeout: float | None = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _metadata(self) -> bytes:
        return _META.pack(_MAGIC, os.getpid()) + self._addr

    def _connect(self, metadata: bytes, timeout: float) -> Peer:
        if len(metadata) < _META.size or metadata[:4] != _MAGIC:
            raise InvalidArgument("not ucx:// endpoint metadata")
        _, pid = _META.unpack_from(metadata)
        addr = metadata[_META.size :]

        async def go() -> UcxPeer:
            ep = await self.ucxx.create_endpoint_from_worker_address(
                self.ucxx.get_ucx_address_from_buffer(addr), endpoint_error_handling=self.error_handling
            )
            peer = UcxPeer(f"ucx://pid-{pid}", metadata, ep, int.from_bytes(os.urandom(2), "little") | 1)
            ep.set_close_callback(peer.on_close)
            await self._request(peer, PING, [], self._addr, 0 if self.error_handling else F_NO_ERRH, None)
            return peer

        try:
            peer: UcxPeer = self._run(go(), timeout)
        except (TimeoutError, OSError) as e:
            raise TransportError(f"cannot connect to ucx peer pid {pid}: {e}") from e
        self._peers.append(peer)
        return peer

    async def _request(
        self, p: UcxPeer, op: int, wd: list[WireDesc], aux: bytes, flags: int, data_base: int | None
    ) -> tuple[int, list[int]]:
        """Send one request; returns (req_id, checksums) of its first reply or raises."""
        p.seq += 1
        req = (p.client_id << 32) | (p.seq & 0xFFFFFFFF)
        extra = _U64.pack(data_base or 0)
        msg = pack_header(op, flags, req, len(wd), len(extra) + len(aux)) + pack_descs(wd) + extra + aux
        await p.ep.send(msg, tag=REQ_TAG, force_tag=True)
        return req, await self._reply(p, req, len(wd))

    async def _reply(self, p: UcxPeer, req: int, count: int) -> list[int]:
        buf = bytearray(HEADER.size + 8 * count + 4096)
        await p.ep.recv(buf, tag=reply_tag(req), force_tag=True)
        h = parse_header(bytes(buf[: HEADER.size]))
        sums = [_U64.unpack_from(buf, HEADER.size + 8 * i)[0] for i in range(h.n)]
        end = HEADER.size + 8 * h.n
        if h.flags != OK:
            raise status_error(h.flags, f"{p.name}: {bytes(buf[end : end + h.aux_len]).decode(errors='replace')}")
        return sums

    async def _write(self, p: UcxPeer, descs: list[Desc], checksum: bool, notify: bytes | None) -> None:
        base = p.data_seq
        p.data_seq += len(descs)
        wd = [WireDesc(d.remote.region_id, d.remote_offset, d.length, xxh(_slice(d)) if checksum else 0)
              for d in descs]
        req, _ = await self._request(p, WRITE, wd, notify or b"", F_CHECKSUM if checksum else 0, base)
        await asyncio.gather(*(
            p.ep.send(_slice(d), tag=data_tag(p.client_id, base + i), force_tag=True)
            for i, d in enumerate(descs)
        ))
        await self._reply(p, req, 0)

    async def _read(self, p: UcxPeer, descs: list[Desc], checksum: bool) -> None:
        base = p.data_seq
        p.data_seq += len(descs)
        wd = [WireDesc(d.remote.region_id, d.remote_offset, d.length, 0) for d in descs]
        _, sums = await self._request(p, READ, wd, b"", F_CHECKSUM if checksum else 0, base)
        await asyncio.gather(*(
            p.ep.recv(_slice(d), tag=data_tag(p.client_id, base + i), force_tag=True)
            for i, d in enumerate(descs)
        ))
        if checksum:
            for i, d in enumerate(descs):
                if xxh(_slice(d)) != sums[i]:
                    raise Corruption(f"{p.name}: range {i} failed its checksum on arrival")

    def _submit(self, p: Peer, h: Handle, make: Any) -> None:
        peer = _ucx(p)

        async def run() -> None:
            task = asyncio.current_task()
            assert task is not None
            peer.tasks.add(task)
            try:
                if peer.dead:
                    raise TransportError(f"{peer.name}: endpoint failed")
                await make(peer)
            finally:
                peer.tasks.discard(task)

        fut: Future[None] = asyncio.run_coroutine_threadsafe(run(), self.loop)

        def done(f: Future[None]) -> None:
            err: BaseException | None = None
            if f.cancelled():
                err = TransportError(f"{h.what}: peer endpoint failed") if peer.dead else None
            else:
                e = f.exception()
                if isinstance(e, KVStoreError):
                    err = e
                elif e is not None:
                    err = TransportError(f"{h.what}: {type(e).__name__}: {e}")
            h._part_done(err)

        fut.add_done_callback(done)
        def abort() -> None:
            self.loop.call_soon_threadsafe(fut.cancel)

        h._set_abort(abort)

    def _post_write(self, peer: Peer, descs: list[Desc], h: Handle, checksum: bool,
                    notify: bytes | None) -> None:
        self._submit(peer, h, lambda p: self._write(p, descs, checksum, notify))

    def _post_read(self, peer: Peer, descs: list[Desc], h: Handle, checksum: bool) -> None:
        self._submit(peer, h, lambda p: self._read(p, descs, checksum))

    def _post_notify(self, peer: Peer, msg: bytes, h: Handle) -> None:
        self._submit(peer, h, lambda p: self._request(p, NOTIFY, [], msg, 0, None))

    def _close(self) -> None:
        self._server.close()
        for p in self._peers:
            p.close()


def _slice(d: Desc) -> Any:
    if d.local.view is not None:
        return d.local.view[d.local_offset : d.local_offset + d.length]
    return d.local.obj.ravel().view("uint8")[d.local_offset : d.local_offset + d.length]


def _ucx(peer: Peer) -> UcxPeer:
    if not isinstance(peer, UcxPeer):  # a peer from another transport: caller error
        raise InvalidArgument(f"peer {peer.name} was not connected by a ucx:// transport")
    return peer

