"""Phantom hits: a replica a client fails to verify is reported and leaves the master's view."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvstore.client import Client
from kvstore.testing.cluster import Cluster
from tests.connectors.conftest import corrupt_value


def test_a_replica_that_fails_verification_stops_counting_as_a_hit(tmp_path: Path) -> None:
    with Cluster(tmp_path, dram="32MiB").start(nodes=1) as cl:
        value = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
        with Client(cl.master_address, timeout=10) as c:
            c.put_batch([(b"good", value[::-1]), (b"bad", value)])
            assert c.longest_prefix([b"bad"]) == 1
            assert corrupt_value(cl.nodes[0].pid, value) == 1
        with Client(cl.master_address, timeout=10) as reader:  # a fresh reader: no cached location
            assert reader.get(b"bad") is None  # never wrong bytes: a miss
            assert reader.counters["bad_replicas_reported"] == 1
            assert reader.longest_prefix([b"bad"]) == 0  # the phantom is gone for every engine
            assert not reader.exists(b"bad")
            assert reader.get(b"good") == value[::-1]  # nothing else touched
            st = reader.stats()
            assert st.counters["bad_replicas"] == 1
            reader.put(b"bad", value)  # and the key can be stored again
            assert reader.get(b"bad") == value
