"""A node reports any number of lost keys: heartbeats carry them in pages the master accepts."""

from __future__ import annotations

import time

import pytest

import kvstore.node.daemon as daemon
from kvstore.client import Client
from kvstore.config import MasterConfig, NodeConfig, StoreConfig
from kvstore.master.server import serve_master
from kvstore.node.daemon import StoreNode


def test_more_lost_keys_than_a_batch_get_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "LOST_PAGE", 40)
    cfg = MasterConfig(port=0, metrics_port=-1, node_ttl="3s", heartbeat_interval="0.1s", max_batch=50)
    with serve_master(cfg) as m:
        node = StoreNode(NodeConfig(master=m.address, transports=("tcp://",), metrics_port=-1),
                         StoreConfig(dram="8MiB", prefault=False)).start(register_timeout=10)
        try:
            keys = [b"lost-%04d" % i for i in range(170)]
            with Client(m.address, timeout=10) as c:
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
        finally:
            node.stop()
