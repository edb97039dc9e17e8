import gc
import os
import threading

import numpy as np
import pytest

from kvstore import InvalidArgument, LocalStore, NoSpace

MiB = 1 << 20


@pytest.fixture
def store(disk_dir):
    s = LocalStore(dram="8MiB", disk_dir=disk_dir, disk="32MiB", prefault=False)
    yield s
    s.close()


def test_api_roundtrip(store):
    data = os.urandom(MiB)
    store.put(b"k", data)
    assert store.exists(b"k") and store.size_of(b"k") == MiB
    assert store.get(b"k") == data
    buf = np.zeros(2 * MiB, dtype=np.uint8)
    assert store.get_into(b"k", buf) == MiB and buf[:MiB].tobytes() == data
    view = store.get_view(b"k")
    assert view.tobytes() == data and not view.flags.writeable
    assert store.get("missing") is None and store.get_view("missing") is None
    assert store.get_into("missing", buf) is None
    assert store.remove(b"k") and not store.exists(b"k")
    st = store.stats()["counters"]
    assert st["hits.dram"] == 3 and st["misses.not_found"] == 3


def test_str_keys_and_numpy_values(store):
    arr = np.arange(1000, dtype=np.float16)
    store.put("prefix/chunk-0", arr)
    assert np.frombuffer(store.get("prefix/chunk-0"), dtype=np.float16).tolist() == arr.tolist()


def test_demotes_lru_to_disk_and_promotes_on_hit(store):
    vals = {b"k%d" % i: os.urandom(MiB) for i in range(16)}
    for k, v in vals.items():
        store.put(k, v)
    st = store.stats()
    assert st["tiers"]["dram"]["used"] <= 0.95 * 8 * MiB
    assert st["counters"]["demotions"] >= 8
    # Oldest keys went to disk, newest stayed in DRAM.
    assert st["tiers"]["disk"]["chunks"] >= 8
    assert store.get(b"k0") == vals[b"k0"]
    st = store.stats()["counters"]
    assert st["hits.disk"] == 1 and st["promotions"] == 1
    assert store.get(b"k0") == vals[b"k0"]
    assert store.stats()["counters"]["hits.dram"] == 1
    for k, v in vals.items():
        assert store.get(k) == v


def test_watermarks(disk_dir):
    with LocalStore(dram="10MiB", disk_dir=disk_dir, disk="64MiB", high_watermark=0.8,
                    low_watermark=0.5, prefault=False) as s:
        for i in range(8):
            s.put(b"k%d" % i, os.urandom(MiB))
        used = s.stats()["tiers"]["dram"]["used"]
        assert used <= 0.8 * 10 * MiB
        # Crossing high (8 MiB) demotes down to low (5 MiB).
        s.put(b"k8", os.urandom(MiB))
        assert s.stats()["tiers"]["dram"]["used"] <= 0.5 * 10 * MiB + MiB


def test_pins_are_never_evicted(disk_dir):
    with LocalStore(dram="4MiB", prefault=False) as s:  # no disk tier: eviction drops
        s.put(b"pinned", os.urandom(MiB), pin=True)
        for i in range(10):
            s.put(b"k%d" % i, os.urandom(MiB))
        assert s.exists(b"pinned") and not s.exists(b"k0")
        assert s.stats()["counters"]["evictions.dropped"] >= 7
        s.put(b"p2", os.urandom(MiB), pin=True)
        s.put(b"p3", os.urandom(MiB), pin=True)
        with pytest.raises(NoSpace, match="pinned"):
            s.put(b"p4", os.urandom(2 * MiB), pin=True)
        assert s.exists(b"pinned") and s.exists(b"p2") and s.exists(b"p3")
        assert s.unpin(b"p2") and not s.unpin(b"p2")
        s.put(b"p4", os.urandom(MiB))
        s.put(b"p5", os.urandom(MiB))
        assert not s.exists(b"p2")  # the unpinned one made room


def test_value_larger_than_dram_goes_to_disk(store):
    big = os.urandom(12 * MiB)
    store.put(b"big", big)
    assert store.stats()["tiers"]["disk"]["chunks"] == 1
    assert store.get(b"big") == big  # too big to promote: served from disk


def test_view_keeps_bytes_alive_across_eviction(store):
    data = os.urandom(MiB)
    store.put(b"a", data)
    view = store.get_view(b"a")
    for i in range(20):  # push "a" out of DRAM
        store.put(b"k%d" % i, os.urandom(MiB))
    assert view.tobytes() == data
    del view
    gc.collect()


def test_longest_prefix_and_batches(store):
    keys = [b"c%d" % i for i in range(6)]
    store.put_batch([(k, k * 100) for k in keys[:4]])
    assert store.longest_prefix(keys) == 4
    store.remove(keys[1])
    assert store.longest_prefix(keys) == 1
    assert store.exists_batch(keys[:3]) == [True, False, True]
    assert store.get_batch([keys[0], keys[1]]) == [keys[0] * 100, None]
    bufs = [bytearray(1000), bytearray(1000)]
    assert store.get_into_batch([keys[2], keys[5]], bufs) == [200, None]
    assert store.remove_batch([keys[0], keys[5]]) == [True, False]


def test_persistence_across_reopen(disk_dir):
    vals = {b"k%d" % i: os.urandom(MiB) for i in range(12)}
    with LocalStore(dram="4MiB", disk_dir=disk_dir, disk="32MiB", prefault=False) as s:
        for k, v in vals.items():
            s.put(k, v)
        on_disk = {k for k in vals if s._m.disk.contains(k)}
    with LocalStore(dram="4MiB", disk_dir=disk_dir, disk="32MiB", prefault=False) as s:
        for k in on_disk:
            assert s.get(k) == vals[k]


def test_many_threads_mixed_ops(store):
    errors: list[str] = []
    vals = {b"t%d" % i: os.urandom(256 * 1024) for i in range(40)}

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(200):
            k = list(vals)[rng.integers(len(vals))]
            op = rng.integers(3)
            if op == 0:
                store.put(k, vals[k])
            elif op == 1:
                got = store.get(k)
                if got is not None and got != vals[k]:
                    errors.append(f"wrong bytes for {k!r}")
            else:
                store.remove(k)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.stats()["tiers"]["dram"]["used"] <= 8 * MiB


@pytest.mark.parametrize("key", [b"", b"x" * 257, 5, None, 1.5])
def test_bad_keys(store, key):
    with pytest.raises(InvalidArgument):
        store.put(key, b"v")
    with pytest.raises(InvalidArgument):
        store.get(key)


def test_bad_values_and_buffers(store):
    with pytest.raises(InvalidArgument, match="empty"):
        store.put(b"k", b"")
    with pytest.raises(InvalidArgument, match="buffer protocol"):
        store.put(b"k", 12345)
    with pytest.raises(InvalidArgument, match="exceeds the largest tier"):
        store.put(b"k", np.zeros(33 * MiB, dtype=np.uint8))
    store.put(b"k", b"x" * 100)
    small = bytearray(b"untouched")
    with pytest.raises(InvalidArgument, match="smaller"):
        store.get_into(b"k", small)
    assert small == b"untouched"
    with pytest.raises(InvalidArgument, match="read-only"):
        store.get_into(b"k", b"\0" * 200)
    with pytest.raises(InvalidArgument):
        store.get_into_batch([b"k"], [])
    assert store.get(b"k") == b"x" * 100  # store still consistent


def test_from_config_object(disk_dir):
    from kvstore import load_config

    cfg = load_config(overrides={"store.dram": "2MiB", "store.prefault": False})
    with LocalStore(cfg.store) as s:
        s.put(b"a", b"b")
        assert s.get(b"a") == b"b"
    with pytest.raises(InvalidArgument):
        LocalStore(cfg.store, dram="1MiB")


def test_two_phase_put_and_held_reads(store):
    from kvstore.checksum import checksum
    from kvstore.errors import Corruption

    data = os.urandom(300_000)
    alloc = store.reserve(len(data))
    alloc.view()[:] = data
    store.commit(b"k", alloc, checksum(data, b"k"))
    lease = store.acquire(b"k")
    assert bytes(lease.view) == data and lease.checksum == checksum(data, b"k")
    off = lease.alloc.offset
    assert bytes(store.arena._mv[off : off + len(data)]) == data
    lease.release()
    # A commit whose bytes do not match is refused and stores nothing.
    bad = store.reserve(10)
    bad.view()[:] = b"0123456789"
    with pytest.raises(Corruption):
        store.commit(b"bad", bad, 12345)
    assert not store.exists(b"bad")
    with pytest.raises(InvalidArgument):
        store.reserve(0)


def test_acquire_promotes_from_disk_and_lost_keys_are_reported(disk_dir):
    with LocalStore(dram="2MiB", disk_dir=disk_dir, disk="2MiB", prefault=False) as s:
        vals = {b"k%d" % i: os.urandom(MiB // 2) for i in range(8)}
        for k, v in vals.items():
            s.put(k, v)
        lost = s.take_lost()
        assert lost and all(not s.exists(k) for k in lost)  # disk LRU dropped them
        assert s.take_lost() == []
        survivor = next(k for k in vals if s.exists(k) and not s._m.dram.contains(k))
        lease = s.acquire(survivor)
        assert bytes(lease.view) == vals[survivor]
        lease.release()
        assert s.stats()["counters"]["promotions"] == 1
        s.remove(survivor)
        assert survivor not in s.take_lost()  # removal is not a loss


def test_failed_overwrite_keeps_the_acknowledged_value(disk_dir, monkeypatch):
    from kvstore.errors import KVStoreError
    from kvstore.tiers.disk import DiskTier

    old, new = os.urandom(100_000), os.urandom(100_000)
    with LocalStore(dram="4MiB", disk_dir=disk_dir, disk="8MiB", write_through=True, prefault=False) as s:
        s.put(b"k", old)

        def broken(*a, **kw):
            raise NoSpace("injected: disk write failed")

        monkeypatch.setattr(DiskTier, "put_padded", broken)
        with pytest.raises(KVStoreError):
            s.put(b"k", new)
        monkeypatch.undo()
        assert s.get(b"k") == old  # the new DRAM copy was dropped; the durable one stayed
    with LocalStore(dram="4MiB", disk_dir=disk_dir, disk="8MiB", prefault=False) as s:
        assert s.get(b"k") == old


def test_overwrite_replaces_every_tier(disk_dir):
    old, new = os.urandom(100_000), os.urandom(100_000)
    with LocalStore(dram="4MiB", disk_dir=disk_dir, disk="8MiB", write_through=True, prefault=False) as s:
        s.put(b"k", old)
        s.put(b"k", new)
        assert s.get(b"k") == new
    with LocalStore(dram="4MiB", disk_dir=disk_dir, disk="8MiB", prefault=False) as s:
        assert s.get(b"k") == new  # the disk copy was swapped, not left stale
    # Without write-through the stale disk copy of a replaced value is dropped.
    with LocalStore(dram="4MiB", disk_dir=disk_dir, disk="8MiB", prefault=False) as s:
        s.put(b"k", old)
        assert s.get(b"k") == old
        assert not s._m.disk.contains(b"k")
