"""One short seed of the chaos harness (kvstore.testing.chaos): real processes killed,
paused, corrupted and, as root, cut off the network, under three clients, with two
masters electing a leader through a real etcd (the master faults hit the leader); no
wrong read, no lost acknowledged write, and every failover answered again. As root
(CI) the processes run on three network namespaces (kvstore.testing.netns: a master
and a node on each of two hosts, the clients beside the third node) and the nemesis
also partitions a host; elsewhere everything runs on loopback. The long run:
``make chaos SEEDS=20``."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.testing import netns
from kvstore.testing.chaos import HOST_NEMESES, NEMESES, run, run_on_hosts
from kvstore.testing.etcd import EtcdServer

pytestmark = pytest.mark.slow


def test_chaos_short_seed(tmp_path: Path) -> None:
    seed = 3
    if netns.available() is None:
        r, kinds = run_on_hosts(seed, tmp_path, seconds=45), HOST_NEMESES
    else:
        with EtcdServer(tmp_path / "etcd") as etcd:
            r, kinds = run(seed, tmp_path / "cluster", seconds=45, etcd=etcd.endpoint), NEMESES
    row = r.row()
    assert set(row["fault_kinds"]) == set(kinds), row["fault_kinds"]  # each kind once, then at random
    assert r.wrong_reads == 0, r.details
    assert r.lost_acked_writes == 0, r.details
    assert r.crashes == [], r.crashes
    assert r.leaks == [], r.leaks  # no pin, lease or node handle outlives its client
    assert sum(r.ops.values()) > 1000 and r.checked > 50
    # every fault of the leader was followed by a new leader answering (times: the benchmark's);
    # a partition counts when it cut the leader's host off
    assert len(r.failovers) >= row["fault_kinds"]["kill_master"] + row["fault_kinds"]["pause_master"]
    assert all(f < 10 for f in r.failovers), r.failovers
