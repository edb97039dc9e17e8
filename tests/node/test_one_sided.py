"""One-sided same-host reads: right bytes or a miss, never a stale or foreign value.

A real master and node processes on loopback; clients in this process. A
cached location is checked by extent generation and the key-seeded checksum;
these tests move the chunk away under the cache (remove, eviction, extent
reuse, node restart) and race readers against eviction.
"""

import itertools
import signal
import threading
import time

import numpy as np
import pytest

from kvstore.checksum import BLOCK, block_sums, block_sums_of, checksum
from kvstore.client import Client
from kvstore.client.locations import Known
from kvstore.client.samehost import MappedNode
from kvstore.errors import InvalidArgument
from kvstore.memory import Arena
from kvstore.node.protocol import SlotStatus
from kvstore.scatter import Scattered
from kvstore.testing.cluster import Cluster
from transport.base import Peer

pytestmark = pytest.mark.timeout(180)
MiB = 1 << 20


def value(seed: int, size: int = MiB) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


@pytest.fixture
def cluster(tmp_path):
    # 8 MiB of DRAM and no disk: a few 1 MiB puts evict and reuse extents.
    c = Cluster(tmp_path, node_ttl="3s", dram="8MiB")
    try:
        yield c.start(nodes=1)
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def test_mapped_read_checks_generation_and_checksum():
    arena = Arena(1 << 20, prefault=False)
    a = arena.alloc(5000)
    data = np.arange(5000, dtype=np.uint32).astype(np.uint8)
    a.view()[:] = data.tobytes()
    loc = Known(None, 5000, checksum(data, b"k"), a.offset, arena.generation(a.offset),  # type: ignore[arg-type]
                block_sums(data, b"k"))
    node = MappedNode(Peer("test", b""), arena.buffer.data, arena.generations.data, arena.alignment)
    dst = bytearray(5000)
    assert node.read(b"k", loc, memoryview(dst)) == SlotStatus.OK
    assert bytes(dst) == data.tobytes()
    assert node.read(b"k", loc, memoryview(dst), [(10, 20), (0, 5)]) == SlotStatus.OK
    assert bytes(dst[:25]) == data[10:30].tobytes() + data[:5].tobytes()
    assert node.read(b"other", loc, memoryview(dst)) == SlotStatus.CORRUPT
    arena.retire(a)  # removed / evicted / replaced
    assert node.read(b"k", loc, memoryview(dst)) == SlotStatus.EXPIRED
    assert node.read(b"k", loc, memoryview(dst), held=True) == SlotStatus.OK  # a hold keeps the bytes
    a.release()
    b = arena.alloc(5000)  # same extent, new allocation: another generation again
    assert b.offset == a.offset and arena.generation(b.offset) not in (loc.generation, loc.generation + 1)
    b.release()
    arena.close()


def test_same_host_reads_are_one_sided_after_the_first(cluster):
    with Client(cluster.master_address) as writer, Client(cluster.master_address) as reader:
        assert writer.put(b"k", value(1))
        assert writer.get(b"k") == value(1)  # the writer knows where it put it
        assert writer.counters["hits.one_sided"] == 1
        buf = bytearray(MiB)
        assert reader.get_into(b"k", buf) == MiB and bytes(buf) == value(1)  # Lookup + leased read
        assert reader.counters["hits.one_sided"] == 0
        for _ in range(3):
            assert reader.get_into(b"k", buf) == MiB and bytes(buf) == value(1)
        assert reader.counters["hits.one_sided"] == 3


def test_removed_key_is_not_served_from_a_cached_location(cluster):
    with Client(cluster.master_address) as a, Client(cluster.master_address) as b:
        assert a.put(b"gone", value(2))
        assert a.get(b"gone") == value(2)
        assert b.remove(b"gone")
        assert a.get(b"gone") is None
        assert a.counters["one_sided.stale"] == 1


def test_evicted_and_reused_extents_never_serve_another_value(cluster):
    with Client(cluster.master_address) as a, Client(cluster.master_address) as b:
        assert a.put(b"first", value(3))
        assert a.get(b"first") == value(3)
        # Fill the 8 MiB node many times over: "first" is evicted and its extent reused.
        for i in range(24):
            assert b.put(b"fill-%d" % i, value(100 + i))
        got = a.get(b"first")
        assert got is None or got == value(3)
        assert a.counters["one_sided.stale"] >= 1 and a.counters["one_sided.corrupt"] == 0


def test_node_restart_invalidates_cached_locations(cluster):
    with Client(cluster.master_address, timeout=20) as a:
        assert a.put(b"k", value(4))
        assert a.get(b"k") == value(4)
        [old] = [n.epoch for n in a.stats().nodes]
        cluster.nodes[0].signal(signal.SIGKILL)
        cluster.nodes[0].popen.wait(10)
        # The killed node's memory is still mapped here, with the right bytes: not a hit.
        assert a.get(b"k") is None
        cluster.start_node(0)
        deadline = time.monotonic() + 30
        while [n.epoch for n in a.stats().nodes] in ([old], []):  # until the new process registered
            assert time.monotonic() < deadline, "the restarted node did not register"
            time.sleep(0.05)
        assert a.get(b"k") is None  # DRAM only: the restarted node does not hold it
        assert a.put(b"k2", value(5)) and a.get(b"k2") == value(5)


def test_readers_racing_eviction_get_the_value_or_a_miss(cluster):
    keys = [b"race-%d" % i for i in range(4)]
    wrong: list[bytes] = []
    hits = [0]
    stop = threading.Event()

    with Client(cluster.master_address) as writer:
        for i, k in enumerate(keys):
            assert writer.put(k, value(10 + i))

        def read() -> None:
            with Client(cluster.master_address) as r:
                buf = bytearray(MiB)
                while not stop.is_set():
                    for i, k in enumerate(keys):
                        n = r.get_into(k, buf)
                        if n is not None:
                            hits[0] += 1
                            if bytes(buf) != value(10 + i):
                                wrong.append(k)

        threads = [threading.Thread(target=read) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            # Churn: evict the race keys, put them back (new extents), over and over.
            for rnd in range(15):
                for j in range(6):
                    writer.put(b"churn-%d-%d" % (rnd, j), value(1000 + j))
                for i, k in enumerate(keys):
                    writer.put(k, value(10 + i))  # False while still stored; re-stored once evicted
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert not wrong
    assert hits[0] > 0


@pytest.mark.parametrize("same_host", [True, False], ids=["same-host", "tcp"])
def test_ranged_reads(cluster, same_host):
    v = value(6, 4 * BLOCK + 123)
    layer = BLOCK + 7  # ranges that do not fall on block boundaries
    with Client(cluster.master_address) as w, Client(cluster.master_address, same_host=same_host) as r:
        assert w.put(b"chunk", v)
        for _ in range(2):  # first through Lookup (+ a hold or FETCH), then from the cache
            buf = bytearray(2 * layer)
            assert r.get_into(b"chunk", buf, ranges=[(2 * layer, layer), (0, layer)]) == 2 * layer
            assert bytes(buf) == v[2 * layer:3 * layer] + v[:layer]
        # "layer l of these chunks", one call, a key repeated with other ranges
        bufs = [bytearray(layer), bytearray(len(v)), bytearray(1)]
        got = r.get_into_batch([b"chunk", b"chunk", b"missing"], bufs,
                               ranges=[[(layer, layer)], [(3 * layer, len(v) - 3 * layer)], [(0, 1)]])
        assert got == [layer, len(v) - 3 * layer, None]
        assert bytes(bufs[0]) == v[layer:2 * layer] and bytes(bufs[1][:got[1]]) == v[3 * layer:]
        if same_host:
            assert r.counters["hits.one_sided"] >= 3
        # Bad input: refused before any byte moves.
        buf = bytearray(b"\xaa" * 10)
        for bad in ([(len(v) - 5, 10)], [(0, 0)], [(-1, 5)], [(0, 11)], []):
            with pytest.raises(InvalidArgument):
                r.get_into(b"chunk", buf, ranges=bad)
        assert buf == bytearray(b"\xaa" * 10)


@pytest.mark.parametrize("same_host", [True, False], ids=["same-host", "tcp"])
def test_ranged_reads_into_scattered_pieces(cluster, same_host):
    """Ranges land straight in separate pieces of memory (an engine's K and V slabs)."""
    v = value(7, 4 * BLOCK + 123)
    layer = BLOCK + 7
    with Client(cluster.master_address) as w, Client(cluster.master_address, same_host=same_host) as r:
        assert w.put(b"chunk", v)
        for _ in range(2):  # first through Lookup (+ a hold or FETCH), then from the cache
            arrs = [np.zeros(n, np.uint8) for n in (1000, layer - 1000, 50, layer - 50)]
            dst = Scattered([a.ctypes.data for a in arrs], [len(a) for a in arrs], owner=arrs)
            assert r.get_into_batch([b"chunk", b"gone"], [dst, dst[:10]],
                                    ranges=[[(2 * layer, layer), (0, layer)], None]) == [2 * layer, None]
            assert np.concatenate(arrs).tobytes() == v[2 * layer:3 * layer] + v[:layer]
        if same_host:
            assert r.counters["hits.one_sided"] >= 1
        whole = [np.zeros(n, np.uint8) for n in (BLOCK, len(v) - BLOCK)]
        assert r.get_into(b"chunk", Scattered([a.ctypes.data for a in whole], [BLOCK, len(v) - BLOCK],
                                              owner=whole)) == len(v)
        assert np.concatenate(whole).tobytes() == v
        with pytest.raises(InvalidArgument):  # pieces smaller than the ranges
            r.get_into(b"chunk", dst[:layer], ranges=[(0, layer + 1)])


@pytest.mark.parametrize("same_host", [True, False], ids=["same-host", "tcp"])
@pytest.mark.parametrize("cuts", [[BLOCK, 3 * BLOCK], [1000, BLOCK + 7, 2 * BLOCK + 5]], ids=["on-blocks", "off-blocks"])
def test_puts_from_scattered_pieces(cluster, same_host, cuts):
    """A value given as pieces of memory (an engine's K and V slabs) is stored without
    being gathered, and reads back as the pieces laid end to end, checksum included."""
    v = value(8, 4 * BLOCK + 123)
    bounds = [0, *cuts, len(v)]
    arrs = [np.frombuffer(v[a:b], dtype=np.uint8).copy() for a, b in itertools.pairwise(bounds)]
    src = Scattered([a.ctypes.data for a in arrs], [len(a) for a in arrs], owner=arrs)
    with Client(cluster.master_address, same_host=same_host) as w, Client(cluster.master_address) as r:
        assert w.put_batch([(b"pieces", src), (b"flat", v)]) == [True, True]
        assert bytes(r.get(b"pieces") or b"") == v
        assert w.put(b"pieces", src) is False  # stored already
        assert bytes(w.get(b"pieces") or b"") == v
    assert block_sums_of(src, b"k").tolist() == block_sums(v, b"k").tolist()


def test_a_connection_raced_by_another_thread_is_not_closed_under_it():
    """Two threads that both found no connection to a node each open one; the second to
    add keeps the first's (which may already be in use) and closes its own."""
    from kvstore.client.connections import Connections, NodeConn

    class Control:
        closed = False

        def close(self) -> None:
            self.closed = True

    conns = Connections("host-a", same_host=True, timeout=5)
    first, second = NodeConn("n1", 3, Control()), NodeConn("n1", 3, Control())
    assert conns.add(first) is first
    assert conns.add(second) is first
    assert second.control.closed and not first.control.closed
    newer = NodeConn("n1", 4, Control())  # the node restarted: the new incarnation replaces the old
    assert conns.add(newer) is newer and first.control.closed
