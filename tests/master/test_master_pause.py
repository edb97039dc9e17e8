"""Faults of the master process must never wipe the pool (real master and node processes)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from kvstore.client import Client
from kvstore.testing.cluster import Cluster

TTL = 2.0


def test_a_master_paused_past_the_node_ttl_keeps_every_key(tmp_path: Path) -> None:
    """SIGSTOP the master for 1.6x the node TTL, then SIGCONT: every key is still there."""
    with Cluster(tmp_path, node_ttl=f"{TTL}s", dram="32MiB").start(nodes=1) as cl:
        keys = [b"pause-%03d" % i for i in range(100)]
        with Client(cl.master_address, timeout=10) as c:
            c.put_batch([(k, k * 10) for k in keys])
            assert all(c.exists_batch(keys))
        assert cl.master is not None
        cl.master.signal(signal.SIGSTOP)
        time.sleep(1.6 * TTL)
        cl.master.signal(signal.SIGCONT)
        time.sleep(TTL)  # a full TTL after resuming: anything the master was going to drop is gone
        with Client(cl.master_address, timeout=10) as c:
            assert all(c.exists_batch(keys))
            assert [c.get(k) for k in keys] == [k * 10 for k in keys]
            assert len(c.stats().nodes) == 1


def test_a_node_declared_dead_keeps_its_chunks_when_it_comes_back(tmp_path: Path) -> None:
    """A node silent past its TTL (SIGSTOP) is declared dead; when it resumes and
    re-registers, the master adopts the chunks it still holds instead of dropping them."""
    with Cluster(tmp_path, node_ttl=f"{TTL}s", dram="32MiB").start(nodes=1) as cl:
        keys = [b"node-%03d" % i for i in range(50)]
        with Client(cl.master_address, timeout=10) as c:
            c.put_batch([(k, k * 10) for k in keys])
        cl.nodes[0].signal(signal.SIGSTOP)
        time.sleep(2.5 * TTL)
        with Client(cl.master_address, timeout=10) as c:
            assert not any(c.exists_batch(keys))  # dead: its replicas are not served
        cl.nodes[0].signal(signal.SIGCONT)
        deadline = time.monotonic() + 20
        with Client(cl.master_address, timeout=10) as c:
            while not all(c.exists_batch(keys)):
                assert time.monotonic() < deadline, "the node's chunks did not come back"
                time.sleep(0.2)
            assert [c.get(k) for k in keys] == [k * 10 for k in keys]
