"""The master's view of replicas stays true: phantoms reported by readers leave it, and a
refused put gives back every reservation it made."""

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


def test_a_refused_item_gives_back_every_reservation_of_the_call(tmp_path: Path) -> None:
    """put_batch([a, too_big, c]): NoSpace, and neither a nor c stays reserved (another
    writer can put c at once; before, only the items ahead of the refused one were revoked)."""
    import pytest

    from kvstore.errors import NoSpace

    with Cluster(tmp_path, dram="8MiB").start(nodes=1) as cl:
        with Client(cl.master_address, timeout=10) as c:
            with pytest.raises(NoSpace):
                c.put_batch([(b"a", b"x" * 1000), (b"too-big", b"y" * (64 << 20)), (b"c", b"z" * 1000)])
            assert c.stats().pending == 0
        with Client(cl.master_address, timeout=10, retries=0) as other:
            other.put(b"c", b"z" * 1000)  # not BUSY
            assert other.get(b"c") == b"z" * 1000
