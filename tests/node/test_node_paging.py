"""A node reports any number of lost keys: heartbeats carry them in pages the master accepts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import kvstore.node.daemon as daemon
from kvstore.client import Client
from kvstore.config import MasterConfig, NodeConfig, StoreConfig
from kvstore.master.server import serve_master
from kvstore.node.daemon import StoreNode


@contextmanager
def master_and_node(**master: Any) -> Iterator[tuple[str, StoreNode]]:
    """An in-process master and one node registered with it: (master address, node)."""
    cfg = MasterConfig(port=0, metrics_port=-1, node_ttl="3s", heartbeat_interval="0.1s", **master)
    with serve_master(cfg) as m:
        node = StoreNode(NodeConfig(master=m.address, transports=("tcp://",), metrics_port=-1),
                         StoreConfig(dram="8MiB", prefault=False)).start(register_timeout=10)
        try:
            yield m.address, node
        finally:
            node.stop()


def test_more_lost_keys_than_a_batch_get_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "LOST_PAGE", 40)
    keys = [b"lost-%04d" % i for i in range(170)]
    with master_and_node(max_batch=50) as (address, node), Client(address, timeout=10) as c:
        for i in range(0, len(keys), 50):
            c.put_batch([(k, b"v") for k in keys[i:i + 50]])
        assert c.stats().objects == 170
        node.store.return_lost(list(keys))  # as if a disk failure took them all
        deadline = time.monotonic() + 15
        while c.stats().objects:
            assert time.monotonic() < deadline, f"{c.stats().objects} replicas still listed"
            time.sleep(0.1)
        st = c.stats()
        assert len(st.nodes) == 1 and st.counters["dead_nodes"] == 0
        assert st.counters["lost_replicas"] == 170


def test_registration_in_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose held keys span several messages registers them all; after a master
    restart (a fresh registration) it reconciles page by page and keeps every key."""
    monkeypatch.setattr(daemon, "HELD_PAGE", 64)
    keys = [b"held-%04d" % i for i in range(300)]
    with master_and_node() as (address, node), Client(address, timeout=10) as c:
        c.put_batch([(k, b"v" * 10) for k in keys])
        node.epoch = 0  # register again: 300 held keys in 5 pages
        deadline = time.monotonic() + 10
        while c.stats().counters["registrations"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        assert c.stats().objects == 300 and all(c.exists_batch(keys))
        assert c.stats().counters["dropped_on_register"] == 0


def test_master_takes_two_million_held_keys_in_pages() -> None:
    """A node holding 2 M chunks registers (one message could not carry them)."""
    import grpc

    from kvstore.v1 import master_pb2 as pb
    from kvstore.v1 import master_pb2_grpc as pb_grpc

    cfg = MasterConfig(port=0, metrics_port=-1, node_ttl="30s")
    n, page = 2_000_000, 200_000
    with serve_master(cfg) as m, grpc.insecure_channel(m.address, options=daemon.GRPC_OPTIONS) as ch:
        stub = pb_grpc.MasterStub(ch)
        held = [pb.HeldKey(key=i.to_bytes(32, "big"), size=16, checksum=i) for i in range(n)]
        r = stub.RegisterNode(pb.RegisterNodeRequest(
            node_id="big", host="h", control_address="127.0.0.1:1",
            tiers=[pb.TierCapacity(name="dram", capacity=1 << 40)], held=held[:page], more_held=True), timeout=60)
        for i in range(page, n, page):
            more = stub.ReportHeld(pb.ReportHeldRequest(node_id="big", epoch=r.epoch, held=held[i:i + page],
                                                        last=i + page >= n), timeout=60)
            assert not more.reregister and not more.drop
        st = stub.Stats(pb.StatsRequest())
        assert st.objects == n and st.counters["adopted_on_register"] == n
        assert stub.LongestPrefix(pb.LongestPrefixRequest(keys=[k.key for k in held[-1000:]])).count == 1000
