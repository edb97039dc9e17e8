"""Disk I/O never blocks DRAM hits: promotions and demotions run outside the manager's lock.

A gate holds the disk tier's reads or writes in flight; meanwhile DRAM reads,
commits and reads of the chunk being demoted must complete. Events, not sleeps.
"""

import os
import threading

import pytest

from kvstore.memory import Arena
from kvstore.testing.tiers import GatedTier
from kvstore.tiers import DiskTier, DramTier, TierManager

MiB = 1 << 20


@pytest.fixture
def tiers(tmp_path):
    disk = GatedTier(DiskTier(tmp_path / "disk", 64 * MiB, direct_io="off", sync=False))
    m = TierManager(DramTier(Arena(8 * MiB, prefault=False)), disk, high_watermark=0.9, low_watermark=0.6)
    yield m, disk
    disk.reads.open()
    disk.writes.open()
    m.close()


def _get(m: TierManager, key: bytes, size: int = MiB) -> bytes | None:
    buf = bytearray(size)
    n = m.get_into(key, memoryview(buf))
    return None if n is None else bytes(buf[:n])


def test_a_disk_hit_in_flight_does_not_block_dram_hits_or_commits(tiers):
    m, disk = tiers
    cold = os.urandom(MiB)
    m.put(b"cold", memoryview(cold))
    for i in range(12):  # push "cold" down to disk
        m.put(b"fill-%d" % i, memoryview(os.urandom(MiB)))
    assert m.disk.contains(b"cold") and not m.dram.contains(b"cold")
    hot = os.urandom(MiB)
    m.put(b"hot", memoryview(hot))
    disk.reads.close()
    got: list[bytes | None] = []
    t = threading.Thread(target=lambda: got.append(_get(m, b"cold")))
    t.start()
    assert disk.reads.entered.wait(10)  # the promotion's disk read is in flight
    assert _get(m, b"hot") == hot  # a DRAM hit meanwhile
    alloc = m.reserve(1000)  # and a two-phase write
    assert alloc is not None
    alloc.view()[:] = b"x" * 1000
    from kvstore.checksum import checksum
    m.commit(b"new", alloc, checksum(b"x" * 1000, b"new"))
    assert t.is_alive()  # all of that while the disk read was still held
    disk.reads.open()
    t.join(10)
    assert got == [cold] and m.counters["promotions"] == 1


def test_a_demotion_in_flight_does_not_block_reads(tiers):
    m, disk = tiers
    values = {b"k%d" % i: os.urandom(MiB) for i in range(6)}
    for k, v in values.items():
        m.put(k, memoryview(v))
    disk.writes.close()
    errors: list[BaseException] = []

    def fill() -> None:  # needs room: demotes the coldest chunks, whose writes are held
        try:
            m.put(b"more", memoryview(os.urandom(2 * MiB)))
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            errors.append(e)

    t = threading.Thread(target=fill)
    t.start()
    assert disk.writes.entered.wait(10)
    # Every chunk stays readable with its bytes, also the one being written to disk.
    for k, v in values.items():
        assert _get(m, k) == v, k
    assert m.contains(b"k0") and t.is_alive()
    disk.writes.open()
    t.join(10)
    assert not errors and m.counters["demotions"] >= 1
    for k, v in values.items():
        assert _get(m, k) == v, k


def test_a_key_removed_or_replaced_while_demoting_leaves_no_stale_copy(tiers):
    m, disk = tiers
    for i in range(6):
        m.put(b"k%d" % i, memoryview(os.urandom(MiB)))
    disk.writes.close()
    t = threading.Thread(target=lambda: m.put(b"more", memoryview(os.urandom(2 * MiB))))
    t.start()
    assert disk.writes.entered.wait(10)
    victim = next(iter(m._demoting))
    new = os.urandom(MiB // 2)
    assert m.remove(victim)
    m.put(victim, memoryview(new))  # replaced while the old bytes are on their way to disk
    disk.writes.open()
    t.join(10)
    assert _get(m, victim) == new
    # Evict it once more: what comes back from disk is the new value, never the old one.
    for i in range(12):
        m.put(b"fill-%d" % i, memoryview(os.urandom(MiB)))
    assert _get(m, victim) in (new, None)
