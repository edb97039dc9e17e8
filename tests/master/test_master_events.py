"""The master's event stream (Events.Watch, kvstore events) against a real master and
node: puts, removes, evictions, lost replicas and node arrivals/deaths arrive in order,
numbered; a subscriber that reconnects with its last sequence number misses nothing in
the window and gets RESYNC beyond it."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from click.testing import CliRunner

from kvstore.client import Client
from kvstore.config import MasterConfig
from kvstore.master.server import serve_master
from kvstore.testing.cluster import Cluster
from kvstore.v1 import master_pb2 as pb

K = pb.PoolEvent


def kinds(events: list[pb.PoolEvent]) -> list[tuple[str, bytes]]:
    return [(K.Kind.Name(e.kind), e.key) for e in events]


def collect(c: Client, n: int, after: int = 0, seconds: float = 10) -> list[pb.PoolEvent]:
    out = []
    for e in c.watch_events(after=after, timeout=seconds):
        out.append(e)
        if len(out) >= n:
            break
    return out


def test_events_in_order_and_resumable(tmp_path: Path) -> None:
    with Cluster(tmp_path, node_ttl="2s", dram="8MiB").start(nodes=1) as cl, \
            Client(cl.master_address, timeout=10) as c:
        seen: list[pb.PoolEvent] = []
        live = threading.Thread(target=lambda: seen.extend(collect(c, 4, seconds=20)), daemon=True)
        live.start()
        c.put(b"a", b"1" * 1000)
        c.put(b"b", b"2" * 1000)
        c.remove(b"a", force=True)
        live.join(20)
        assert kinds(seen) == [("NODE_JOINED", b""), ("STORED", b"a"), ("STORED", b"b"), ("REMOVED", b"a")]
        assert [e.seq for e in seen] == [1, 2, 3, 4] and seen[1].size == 1000 and seen[1].nodes == ["node0"]
        # a subscriber that saw up to seq 2 resumes without a gap
        assert kinds(collect(c, 2, after=2)) == [("STORED", b"b"), ("REMOVED", b"a")]
        # eviction: fill the 8 MiB node past its capacity
        for i in range(12):
            c.put(f"big-{i}".encode(), bytes(1 << 20))
        evs = kinds(collect(c, 100, after=4, seconds=2))
        assert ("EVICTED", b"b") in evs or any(k == "EVICTED" for k, _ in evs)
        # a node that dies: its chunks are lost, the node left
        last = max(e.seq for e in collect(c, 1000, after=0, seconds=2))
        cl.nodes[0].signal(signal.SIGKILL)
        after = collect(c, 100, after=last, seconds=6)
        ks = kinds(after)
        assert ("NODE_LEFT", b"") in ks and ("LOST", b"big-11") in ks
        assert ks.index(("NODE_LEFT", b"")) > ks.index(("LOST", b"big-11"))


def test_a_subscriber_behind_the_window_gets_resync() -> None:
    with serve_master(MasterConfig(port=0, metrics_port=-1, events_window=3)) as m, \
            Client(m.address, timeout=5) as c:
        import grpc

        from kvstore.v1 import master_pb2_grpc as pb_grpc

        stub = pb_grpc.MasterStub(grpc.insecure_channel(m.address))
        stub.RegisterNode(pb.RegisterNodeRequest(node_id="n", host="h", control_address="127.0.0.1:1",
                                                 tiers=[pb.TierCapacity(name="dram", capacity=1 << 30)]))
        for i in range(5):
            r = stub.PutStart(pb.PutStartRequest(items=[pb.PutItem(key=b"k%d" % i, size=10, checksum=1)],
                                                 replicas=1, client_host="x"))
            stub.PutEnd(pb.PutEndRequest(put_id=r.put_id, keys=[b"k%d" % i]))
        got = collect(c, 4, after=1, seconds=3)  # events 1..6 happened; the window holds 4..6
        assert kinds(got) == [("RESYNC", b""), ("STORED", b"k2"), ("STORED", b"k3"), ("STORED", b"k4")]
        assert got[0].seq == 3 and [e.seq for e in got[1:]] == [4, 5, 6]
        assert collect(c, 1, after=6, seconds=0.5) == []  # nothing new: ends at the timeout


def test_kvstore_events_cli(tmp_path: Path) -> None:
    from kvstore.cli import cli

    with serve_master(MasterConfig(port=0, metrics_port=-1)) as m:
        import grpc

        from kvstore.v1 import master_pb2_grpc as pb_grpc

        pb_grpc.MasterStub(grpc.insecure_channel(m.address)).RegisterNode(pb.RegisterNodeRequest(
            node_id="n7", host="h", control_address="127.0.0.1:1",
            tiers=[pb.TierCapacity(name="dram", capacity=1 << 30)]))
        t = time.monotonic()
        r = CliRunner().invoke(cli, ["events", "--master", m.address, "--count", "1", "--seconds", "5"])
        assert r.exit_code == 0, r.output
        assert "\tNODE_JOINED\t-\t0\tn7" in r.output and time.monotonic() - t < 5


def test_async_client_tails_events(tmp_path: Path) -> None:
    """AsyncClient.watch_events: the same stream on asyncio, resumable by sequence number."""
    import asyncio

    from kvstore.client import AsyncClient

    async def tail(address: str) -> tuple[list[pb.PoolEvent], list[pb.PoolEvent]]:
        async with AsyncClient(address, timeout=5) as c:
            await c.put(b"x", b"1" * 100)
            await c.put(b"y", b"2" * 100)
            first = [e async for e in c.watch_events(timeout=1)]
            again = [e async for e in c.watch_events(after=first[0].seq, timeout=1)]
            return first, again

    with Cluster(tmp_path, node_ttl="2s").start(nodes=1) as cl:
        first, again = asyncio.run(tail(cl.master_address))
    assert kinds(first) == [("NODE_JOINED", b""), ("STORED", b"x"), ("STORED", b"y")]
    assert [e.seq for e in again] == [e.seq for e in first[1:]]
