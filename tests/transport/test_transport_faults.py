"""Fault suite: killed peers, deadlines, cancellation, hostile frames."""

from __future__ import annotations

import socket
import struct
import time

import numpy as np
import pytest
from conftest import PeerProcess, pattern

from kvstore.checksum import checksum
from kvstore.errors import InvalidArgument, Timeout, TransportError
from transport.handle import Cancelled
from transport.regions import Desc
from transport.registry import create
from transport.wire import DESC, E_INVALID, E_MALFORMED, HEADER, READ, WRITE, pack_header

pytestmark = pytest.mark.timeout(120)
N = 64 << 20


def _setup(spawn: tuple[str, list[PeerProcess]], raw: bool = False):  # type: ignore[no-untyped-def]
    uri, procs = spawn
    if raw and uri.startswith("ucx"):
        pytest.skip("raw frames need a socket; ucx:// requests are parsed by the same wire code")
    proc = PeerProcess(uri, N)
    procs.append(proc)
    t = create(uri)
    peer = t.connect(proc.metadata, timeout=20)
    r = t.allocate(N, name="local")
    assert r.view is not None
    return t, peer, proc, r, np.frombuffer(r.view, dtype=np.uint8)


def test_peer_killed_mid_transfer(spawn: tuple[str, list[PeerProcess]]) -> None:
    t, peer, proc, r, arr = _setup(spawn)
    want = checksum(pattern(N))
    deadline = 10.0
    killed_at = None
    outcomes = []
    start = time.monotonic()
    while time.monotonic() - start < 20:
        arr[:] = 0
        h = t.read(peer, [Desc(r, 0, proc.region, 0, N)], timeout=deadline)
        if killed_at is None and time.monotonic() - start > 0.3:
            proc.kill()  # SIGKILL while a read is in flight
            killed_at = time.monotonic()
        try:
            h.wait(deadline + 5)
            # Completed reads must hold the whole, correct range.
            assert checksum(arr) == want
            outcomes.append("ok")
        except TransportError:
            outcomes.append("error")
            break
        if killed_at is not None and time.monotonic() - killed_at > deadline:
            break
    assert killed_at is not None and outcomes[-1] == "error", outcomes
    assert time.monotonic() - killed_at < deadline
    with pytest.raises(TransportError):
        t.read(peer, [Desc(r, 0, proc.region, 0, 4096)], timeout=5).wait(10)
    t.close()


def test_deadline_expires(spawn: tuple[str, list[PeerProcess]]) -> None:
    t, peer, proc, r, arr = _setup(spawn)
    hs = [t.read(peer, [Desc(r, 0, proc.region, 0, N)], timeout=0.0005) for _ in range(4)]
    errors = []
    for h in hs:
        try:
            h.wait(5)
        except Timeout as e:
            errors.append(e)
    assert errors, "a 0.5 ms deadline on 64 MiB reads never expired"
    # the transport still works afterwards
    arr[:] = 0
    t.read(peer, [Desc(r, 0, proc.region, 0, N)], timeout=30).wait()
    assert checksum(arr) == checksum(pattern(N))
    t.close()


def test_cancel(spawn: tuple[str, list[PeerProcess]]) -> None:
    t, peer, proc, r, arr = _setup(spawn)
    hs = [t.read(peer, [Desc(r, 0, proc.region, 0, N)], timeout=30) for _ in range(4)]
    for h in hs:
        h.cancel()
    cancelled = 0
    for h in hs:
        try:
            h.wait(10)
        except Cancelled:
            cancelled += 1
    assert cancelled >= 3 and all(h.done() for h in hs)
    arr[:] = 0
    t.read(peer, [Desc(r, 0, proc.region, 0, N)], timeout=30).wait()
    assert checksum(arr) == checksum(pattern(N))
    t.close()


def _raw(t_meta: bytes, uri: str) -> socket.socket:
    if uri.startswith("tcp"):
        port = struct.unpack_from("<H", t_meta, 4)[0]
        return socket.create_connection((t_meta[6:].decode(), port), timeout=5)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(t_meta[8:])
    return s


def _reply_status(s: socket.socket) -> int | None:
    data = b""
    while len(data) < HEADER.size:
        got = s.recv(HEADER.size - len(data))
        if not got:
            return None
        data += got
    return int(HEADER.unpack(data)[3])


def test_hostile_frames_rejected_server_keeps_serving(spawn: tuple[str, list[PeerProcess]]) -> None:
    uri, _ = spawn
    t, peer, proc, r, arr = _setup(spawn, raw=True)
    before = proc.sum(0, N)
    rid = proc.region.region_id
    frames = {
        "garbage": b"\xff" * HEADER.size,
        "bad version": HEADER.pack(b"KVTP", 99, WRITE, 0, 1, 0, 0),
        "oversize count": pack_header(WRITE, 0, 1, 10_000_000, 0),
        "oversize aux": pack_header(WRITE, 0, 1, 0, 1 << 30),
        "out of bounds": pack_header(WRITE, 0, 1, 1, 0) + DESC.pack(rid, N - 10, 11, 0) + b"x" * 11,
        "huge length": pack_header(WRITE, 0, 1, 1, 0) + DESC.pack(rid, 0, 1 << 62, 0) + b"x" * 64,
        "unknown region": pack_header(WRITE, 0, 1, 1, 0) + DESC.pack(rid + 999, 0, 8, 0) + b"x" * 8,
        "read out of bounds": pack_header(READ, 0, 1, 1, 0) + DESC.pack(rid, N, 1, 0),
    }
    for what, frame in frames.items():
        s = _raw(proc.metadata, uri)
        s.sendall(frame)
        status = _reply_status(s)
        s.close()
        assert status in (E_MALFORMED, E_INVALID, None), what
    assert proc.sum(0, N) == before, "a rejected frame touched memory"
    # still serving, over new connections and the existing peer
    arr[:] = 0
    t.read(peer, [Desc(r, 0, proc.region, 0, N)], timeout=30).wait()
    assert checksum(arr) == before
    t2 = create(uri)
    p2 = t2.connect(proc.metadata, timeout=10)
    r2 = t2.allocate(4096)
    t2.write(p2, [Desc(r2, 0, proc.region, 0, 4096)], timeout=10).wait()
    assert proc.sum(0, 4096) == checksum(bytes(4096))
    t2.close()
    t.close()


def test_remote_descriptor_beyond_real_region_rejected(spawn: tuple[str, list[PeerProcess]]) -> None:
    """A forged RemoteRegion claiming more bytes than the peer registered is refused by the peer."""
    from transport.regions import RemoteRegion  # noqa: PLC0415

    t, peer, proc, r, arr = _setup(spawn)
    before = proc.sum(0, N)
    forged = RemoteRegion(proc.region.region_id, proc.region.nbytes * 2, proc.region.extra)
    h = t.write(peer, [Desc(r, 0, forged, N - 4096, 8192)], timeout=10)
    with pytest.raises((InvalidArgument, TransportError)):
        h.wait(15)
    assert proc.sum(0, N - 4096) == checksum(pattern(N)[: N - 4096])
    assert before is not None
    t.close()
