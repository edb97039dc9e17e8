"""Client side of ``shm://``: control connection, segment mappings, the copies themselves.

A stripe copies each range once, straight between the local region and the
peer's memory: through the peer's mapped segment (copied in pieces so that a
cancel or deadline stops it promptly) or with cross-memory attach. After the
copies the control socket is checked: if the peer died meanwhile, the stripe
fails with TransportError instead of reporting bytes nobody will see.
"""

from __future__ import annotations

import itertools
import mmap
import select
import socket
import struct
import threading
import time

import numpy as np

from kvstore.checksum import checksum as xxh
from kvstore.errors import Corruption, InvalidArgument, Timeout, TransportError
from transport.base import Peer
from transport.handle import Handle
from transport.regions import Desc, RemoteRegion
from transport.shm.memory import KIND_CMA, KIND_FD, address, cma, map_fd, populate
from transport.wire import (
    HEADER,
    OK,
    READ,
    REGION,
    WireDesc,
    pack_descs,
    pack_header,
    parse_header,
    recv_bytes,
    settimeout,
    status_error,
)

PIECE = 16 << 20
_U64 = struct.Struct("<Q")
CMA_EXTRA = struct.Struct("<BIQ")  # kind, pid, address


class ShmPeer(Peer):
    """Control connection to one ``shm://`` peer plus its mapped segments. Thread-safe."""

    def __init__(self, name: str, metadata: bytes, sock_name: bytes, timeout: float) -> None:
        super().__init__(name, metadata)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(sock_name)
        except OSError as e:
            self._sock.close()
            raise TransportError(f"cannot connect to {name}: {e}") from e
        self._lock = threading.Lock()
        self._maps: dict[int, mmap.mmap] = {}
        self._ids = itertools.count(1)

    def request(
        self, op: int, descs: list[WireDesc], aux: bytes, deadline: float | None
    ) -> tuple[list[int], list[int]]:
        """One request/reply on the control socket -> (checksums, received fds)."""
        with self._lock:
            if self.closed:
                raise TransportError(f"{self.name}: connection closed")
            try:
                settimeout(self._sock, deadline)
                req = next(self._ids)
                self._sock.sendall(pack_header(op, 0, req, len(descs), len(aux)) + pack_descs(descs) + aux)
                data, fds, _, _ = socket.recv_fds(self._sock, HEADER.size, 4)
                if not data:
                    raise TransportError(f"{self.name}: peer closed the control connection")
                if len(data) < HEADER.size:
                    data += recv_bytes(self._sock, HEADER.size - len(data))
                h = parse_header(data)
                sums = [_U64.unpack(recv_bytes(self._sock, 8))[0] for _ in range(h.n)]
                msg = recv_bytes(self._sock, h.aux_len).decode(errors="replace")
            except TimeoutError as e:
                self._fail()
                raise Timeout(f"{self.name}: control request timed out") from e
            except OSError as e:
                self._fail()
                raise TransportError(f"{self.name}: control connection failed: {e}") from e
        if h.flags != OK:
            raise status_error(h.flags, f"{self.name}: {msg}")
        return sums, fds

    def mapping(self, rr: RemoteRegion, deadline: float | None) -> memoryview:
        with self._lock:
            m = self._maps.get(rr.region_id)
        if m is None:
            _, fds = self.request(REGION, [WireDesc(rr.region_id, 0, 0, 0)], b"", deadline)
            if len(fds) != 1:
                raise TransportError(f"{self.name}: no segment descriptor for region {rr.region_id}")
            m = map_fd(fds[0], rr.nbytes)
            with self._lock:
                m = self._maps.setdefault(rr.region_id, m)
        return memoryview(m)

    def alive(self) -> bool:
        """False once the peer closed its end (idle control socket became readable/hung up)."""
        with self._lock:
            if self.closed:
                return False
            p = select.poll()
            p.register(self._sock, select.POLLIN | select.POLLHUP | select.POLLERR)
            return not p.poll(0)

    def _fail(self) -> None:
        self.closed = True
        self._sock.close()

    def close(self) -> None:
        with self._lock:
            super().close()
            self._sock.close()
            maps, self._maps = self._maps, {}
        for m in maps.values():
            try:
                m.close()
            except BufferError:
                pass  # a copy still holds a view; the mapping goes with it


def run_stripe(peer: ShmPeer, descs: list[Desc], write: bool, owner: Handle, checksum: bool) -> None:
    """Copy every range of ``descs`` (write: local -> peer). Raises on failure or abort."""
    cma_l: list[tuple[int, int]] = []
    cma_r: list[tuple[int, int]] = []
    cma_descs: list[Desc] = []
    pid = 0
    for d in descs:
        assert d.local.view is not None
        lv = d.local.view[d.local_offset : d.local_offset + d.length]
        kind = d.remote.extra[0] if d.remote.extra else 0
        if kind == KIND_FD:
            rv = peer.mapping(d.remote, owner.deadline)[d.remote_offset : d.remote_offset + d.length]
            populate(rv, write)
            src, dst = (lv, rv) if write else (rv, lv)
            _copy(src, dst, owner)
            if checksum and xxh(dst) != xxh(src):
                raise Corruption(f"{owner.what}: range landed with a checksum mismatch")
        elif kind == KIND_CMA:
            _, pid, base = CMA_EXTRA.unpack(d.remote.extra)
            cma_l.append((address(lv), d.length))
            cma_r.append((base + d.remote_offset, d.length))
            cma_descs.append(d)
        else:
            raise InvalidArgument(f"{owner.what}: region {d.remote.region_id} is not an shm region")
    if cma_l:
        _check(owner)
        cma(pid, cma_l, cma_r, write)
        if checksum:
            want = [WireDesc(d.remote.region_id, d.remote_offset, d.length, 0) for d in cma_descs]
            sums, _ = peer.request(READ, want, b"", owner.deadline)
            for d, s in zip(cma_descs, sums, strict=True):
                assert d.local.view is not None
                if xxh(d.local.view[d.local_offset : d.local_offset + d.length]) != s:
                    raise Corruption(f"{owner.what}: range landed with a checksum mismatch")
    if not peer.alive():
        raise TransportError(f"{owner.what}: peer {peer.name} went away during the transfer")


def _copy(src: memoryview, dst: memoryview, owner: Handle) -> None:
    s = np.frombuffer(src, dtype=np.uint8)
    d = np.frombuffer(dst, dtype=np.uint8)
    for off in range(0, len(s), PIECE):
        _check(owner)
        np.copyto(d[off : off + PIECE], s[off : off + PIECE])


def _check(owner: Handle) -> None:
    if owner.aborted:
        raise TransportError(f"{owner.what}: aborted")
    if owner.deadline is not None and time.monotonic() > owner.deadline:
        raise Timeout(f"{owner.what}: deadline expired")
