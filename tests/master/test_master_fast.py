"""The master's framed channel: same answers as gRPC, same token, hostile frames refused."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import grpc
import msgpack
import pytest

from kvstore.config import MasterConfig
from kvstore.errors import InvalidArgument, PermissionDenied
from kvstore.framing import FLAG_ERROR, HEADER
from kvstore.master.fast import AUTH, MAGIC, OPS, FastMasterClient, frame, parse
from kvstore.master.server import MasterThread, serve_master
from kvstore.v1 import master_pb2 as pb
from kvstore.v1 import master_pb2_grpc as pb_grpc
from transport.wire import recv_bytes


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


@pytest.fixture(scope="module")
def master() -> Iterator[MasterThread]:
    with serve_master(MasterConfig(port=0, metrics_port=-1, max_batch=100), token="s3cret") as m:
        yield m


def fast_address(m: MasterThread, token: str = "s3cret") -> str:
    with grpc.insecure_channel(m.address) as ch:
        hello = pb_grpc.MasterStub(ch).Hello(pb.HelloRequest(), metadata=[("authorization", f"Bearer {token}")])
    assert hello.fast_address
    return str(hello.fast_address)


def test_same_calls_same_answers_with_the_token(master: MasterThread) -> None:
    c = FastMasterClient(fast_address(master), b"Bearer s3cret")
    try:
        reg = c.call("RegisterNode", pb.RegisterNodeRequest(
            node_id="n1", host="h1", control_address="127.0.0.1:1",
            tiers=[pb.TierCapacity(name="dram", capacity=1 << 30)]), 5)
        assert reg.epoch > 0
        r = c.call("PutStart", pb.PutStartRequest(items=[pb.PutItem(key=key(1), size=10, checksum=3)],
                                                   replicas=1, client_host="h1"), 5)
        assert c.call("PutEnd", pb.PutEndRequest(put_id=r.put_id, keys=[key(1)]), 5).statuses == [pb.OK]
        assert c.call("LongestPrefix", pb.LongestPrefixRequest(keys=[key(1), key(2)]), 5).count == 1
        with grpc.insecure_channel(master.address) as ch:  # gRPC sees the same state
            got = pb_grpc.MasterStub(ch).Lookup(pb.LookupRequest(keys=[key(1)]),
                                                metadata=[("authorization", "Bearer s3cret")])
        assert got.locations[0].status == pb.OK and got.locations[0].checksum == 3
        # Limits and validation are the servicer's: a refused request, not a dropped channel.
        with pytest.raises(InvalidArgument, match="max_batch"):
            c.call("Lookup", pb.LookupRequest(keys=[key(i) for i in range(101)]), 5)
        assert c.call("Stats", pb.StatsRequest(), 5).objects == 1
    finally:
        c.close()


@pytest.mark.parametrize("auth", [None, b"Bearer wrong"])
def test_token_is_required(master: MasterThread, auth: bytes | None) -> None:
    c = FastMasterClient(fast_address(master), auth)
    with pytest.raises(PermissionDenied):
        c.call("Stats", pb.StatsRequest(), 5)
    c.close()


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\n\r\n" + b"x" * 20,                                      # not a frame
    HEADER.pack(MAGIC, 1, OPS["Stats"], 0, 1 << 30),                           # oversize
    frame(200, b""),                                                           # unknown op
    frame(OPS["Lookup"], b"\xff\xff\xff"),                                     # not protobuf
])
def test_hostile_frames_get_an_error_and_a_closed_connection(master: MasterThread, data: bytes) -> None:
    host, _, port = fast_address(master).rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(frame(AUTH, b"Bearer s3cret"))
        parse(recv_bytes(s, HEADER.size), 0)
        s.sendall(data)
        _op, flags, length = parse(recv_bytes(s, HEADER.size), 1 << 16)
        assert flags & FLAG_ERROR and msgpack.unpackb(recv_bytes(s, length))[0] == "INVALID_ARGUMENT"
        assert s.recv(1) == b""  # closed
    # ... and the master still serves.
    c = FastMasterClient(fast_address(master), b"Bearer s3cret")
    assert c.call("Stats", pb.StatsRequest(), 5) is not None
    c.close()


def test_off_means_clients_use_grpc(tmp_path) -> None:
    from kvstore.client import Client

    with serve_master(MasterConfig(port=0, metrics_port=-1, fast_port=-1)) as m:
        with grpc.insecure_channel(m.address) as ch:
            assert pb_grpc.MasterStub(ch).Hello(pb.HelloRequest()).fast_address == ""
        with Client(m.address) as c:
            assert c.longest_prefix([key(1)]) == 0 and c._fast is None
    with serve_master(MasterConfig(port=0, metrics_port=-1)) as m, Client(m.address) as c:
        assert c.longest_prefix([key(1)]) == 0 and c._fast is not None  # the framed channel


def test_connections_over_the_cap_are_closed_and_clients_fall_back() -> None:
    from kvstore.client import Client

    with serve_master(MasterConfig(port=0, metrics_port=-1, max_fast_connections=2)) as m:
        with grpc.insecure_channel(m.address) as ch:
            addr = pb_grpc.MasterStub(ch).Hello(pb.HelloRequest()).fast_address
        h, _, p = addr.rpartition(":")
        socks = [socket.create_connection((h, int(p)), timeout=5) for _ in range(5)]
        try:
            time.sleep(0.3)
            closed = 0
            for s in socks:
                s.settimeout(0.5)
                try:
                    closed += s.recv(1) == b""
                except TimeoutError:
                    pass  # held open: within the cap
            assert closed == 3
            with Client(m.address, timeout=5) as c:  # its framed connection is refused: gRPC answers
                assert c.stats().objects == 0
        finally:
            for s in socks:
                s.close()


def _put_start(c: FastMasterClient, k: bytes) -> int:
    r = c.call("PutStart", pb.PutStartRequest(items=[pb.PutItem(key=k, size=10, checksum_at_end=True)],
                                              replicas=1, client_host="h1"), 5)
    assert r.placements[0].status == pb.OK
    return int(r.put_id)


def test_posted_calls_are_answered_in_order_on_two_connections(master: MasterThread) -> None:
    """A stream of PutStart + posted PutEnd: every posted reply reaches its ``done``, the
    next call sees what the posted one did, and the pool stays at two connections."""
    c = FastMasterClient(fast_address(master), b"Bearer s3cret")
    got: list[object] = []
    try:
        c.call("RegisterNode", pb.RegisterNodeRequest(
            node_id="n-post", host="h1", control_address="127.0.0.1:1",
            tiers=[pb.TierCapacity(name="dram", capacity=1 << 30)]), 5)
        opened = 0
        real_take = c._take

        def counting_take(timeout: float) -> socket.socket:
            nonlocal opened
            with c._lock:
                opened += not c._idle and len(c._posted) < 2
            return real_take(timeout)

        c._take = counting_take  # type: ignore[method-assign]
        for i in range(20):
            k = key(1000 + i)
            put_id = _put_start(c, k)
            c.post("PutEnd", pb.PutEndRequest(put_id=put_id, keys=[k], checksums=[7]), 5, got.append)
            assert len(c._posted) <= 2
        c.settle()
        assert c.call("LongestPrefix", pb.LongestPrefixRequest(keys=[key(1000 + i) for i in range(20)]), 5).count == 20
        assert [list(r.statuses) for r in got] == [[pb.OK]] * 20  # type: ignore[attr-defined]
        assert opened == 1  # a second connection beside RegisterNode's: two in all
        # A posted call that fails is told so: an unknown reservation lapses.
        c.post("PutEnd", pb.PutEndRequest(put_id=123456789, keys=[key(1)], checksums=[1]), 5, got.append)
        c.settle()
        assert list(got[-1].statuses) == [pb.EXPIRED]  # type: ignore[attr-defined]
    finally:
        c.close()


def test_a_posted_call_to_a_silent_or_dead_master_is_told_so() -> None:
    """``settle(limit)`` gives up on a master that never answers (Timeout), and a master
    that hangs up without answering fails the call (TransportError): never a hang."""
    from kvstore.errors import Timeout, TransportError

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        c = FastMasterClient(f"127.0.0.1:{srv.getsockname()[1]}", None)
        got: list[object] = []
        c.post("Stats", pb.StatsRequest(), 30, got.append)
        peer, _ = srv.accept()
        t = time.monotonic()
        c.settle(limit=0.3)
        assert isinstance(got[0], Timeout) and time.monotonic() - t < 5
        c.post("Stats", pb.StatsRequest(), 30, got.append)
        peer2, _ = srv.accept()
        peer2.close()
        c.settle()
        assert isinstance(got[1], TransportError)
        peer.close()
        c.close()


def test_async_posted_calls(master: MasterThread) -> None:
    import asyncio

    from kvstore.master.fast import AsyncFastMasterClient

    async def main() -> None:
        c = AsyncFastMasterClient(fast_address(master), b"Bearer s3cret")
        got: list[object] = []
        try:
            await c.call("RegisterNode", pb.RegisterNodeRequest(
                node_id="n-apost", host="h1", control_address="127.0.0.1:1",
                tiers=[pb.TierCapacity(name="dram", capacity=1 << 30)]), 5)
            for i in range(10):
                k = key(2000 + i)
                r = await c.call("PutStart", pb.PutStartRequest(
                    items=[pb.PutItem(key=k, size=10, checksum_at_end=True)], replicas=1, client_host="h1"), 5)
                await c.post("PutEnd", pb.PutEndRequest(put_id=r.put_id, keys=[k], checksums=[7]), 5, got.append)
                assert len(c._posted) <= 2
            await c.aclose()
            assert [list(r.statuses) for r in got] == [[pb.OK]] * 10  # type: ignore[attr-defined]
        finally:
            c.close()

    asyncio.run(main())
