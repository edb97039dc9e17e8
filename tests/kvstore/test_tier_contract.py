"""One contract suite, run against every tier."""

import os
import threading

import pytest

from kvstore.checksum import checksum
from kvstore.errors import NoSpace, NotFound
from kvstore.memory import Arena
from kvstore.tiers import DiskTier, DramTier


@pytest.fixture(params=["dram", "disk-direct", "disk-buffered"])
def tier(request, disk_dir):
    if request.param == "dram":
        t = DramTier(Arena(4 << 20, prefault=False))
    else:
        mode = "on" if request.param == "disk-direct" else "off"
        t = DiskTier(disk_dir, 4 << 20, direct_io=mode)
    yield t
    t.close()


def read(tier, key):
    e = tier.entry(key)
    buf = bytearray(e.size)
    tier.read_into(key, memoryview(buf))
    return bytes(buf)


@pytest.mark.parametrize("size", [1, 511, 4096, 4097, 1 << 20])
def test_put_then_read_roundtrip(tier, size):
    data = os.urandom(size)
    cs = tier.put(b"k", data)
    assert cs == checksum(data, b"k")
    assert tier.entry(b"k").size == size and tier.contains(b"k")
    assert read(tier, b"k") == data


def test_replace_is_atomic_and_frees_old_space(tier):
    tier.put(b"k", os.urandom(100_000))
    used = tier.used
    new = os.urandom(100_000)
    tier.put(b"k", new)
    assert tier.used == used and len(tier) == 1
    assert read(tier, b"k") == new


def test_remove_and_missing(tier):
    tier.put(b"k", b"v" * 10)
    assert tier.remove(b"k") and not tier.remove(b"k")
    assert tier.entry(b"k") is None and tier.used == 0
    with pytest.raises(NotFound):
        tier.read_into(b"k", memoryview(bytearray(10)))


def test_capacity_honoured_exactly(tier):
    chunk = tier.charge(300_000)
    n = tier.capacity // chunk
    for i in range(n):
        tier.put(b"k%d" % i, os.urandom(300_000))
    assert tier.used == n * chunk <= tier.capacity
    assert not tier.fits(300_000)
    with pytest.raises(NoSpace):
        tier.put(b"overflow", os.urandom(300_000))
    assert len(tier) == n  # nothing lost by the failed put


def test_concurrent_readers(tier):
    vals = {b"k%d" % i: os.urandom(50_000) for i in range(20)}
    for k, v in vals.items():
        tier.put(k, v)
    errors = []

    def reader():
        for _ in range(20):
            for k, v in vals.items():
                if read(tier, k) != v:
                    errors.append(k)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_capabilities_declared(tier):
    caps = tier.capabilities
    assert caps.medium in ("dram", "disk")
    assert caps.persistent == (caps.medium == "disk")
    assert caps.zero_copy == (caps.medium == "dram")
