"""The pooled store with real processes on loopback: master, nodes, clients."""

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvstore.client import Client
from kvstore.errors import InvalidArgument, KVStoreError, TryAgain
from kvstore.testing.cluster import Cluster

sys.path.insert(0, str(Path(__file__).parent))
from pool_worker import value_for  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, node_ttl="2s", dram="48MiB")
    try:
        yield c.start(nodes=3)
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def node_of(client: Client, key: bytes) -> str:
    from kvstore.v1 import master_pb2 as mpb

    loc = client._link.stub(5).Lookup(mpb.LookupRequest(keys=[key]), timeout=5).locations[0]
    return loc.nodes[0].node_id if loc.nodes else ""


def test_four_clients_mixed_ops_right_bytes_or_miss(cluster):
    worker = Path(__file__).parent / "pool_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), cluster.master_address, str(seed), "150"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cluster.env())
             for seed in range(4)]
    totals = {"put": 0, "hit": 0, "miss": 0, "remove": 0, "errors": 0}
    for p in procs:
        out, err = p.communicate(timeout=150)
        assert p.returncode == 0, out.decode() + err.decode()[-3000:]
        for k, v in json.loads(out.decode().strip().splitlines()[-1]).items():
            totals[k] += v
    assert totals["hit"] > 50 and totals["put"] > 50, totals
    assert totals["errors"] <= 5, totals
    # Puts spread over the three nodes.
    with Client(cluster.master_address) as c:
        assert sum(1 for n in c.stats().nodes if n.objects > 0) >= 2


def test_same_host_and_tcp_paths_agree(cluster):
    data = np.random.default_rng(3).integers(0, 256, 5 << 20, dtype=np.uint8)
    with Client(cluster.master_address) as shm_client, \
            Client(cluster.master_address, same_host=False) as tcp_client:
        assert shm_client.put(b"big", data)
        assert not tcp_client.put(b"big", data)  # keys are immutable: already there
        buf = np.zeros(6 << 20, dtype=np.uint8)
        assert tcp_client.get_into(b"big", buf) == data.nbytes
        assert np.array_equal(buf[: data.nbytes], data)
        assert shm_client.get(b"big") == data.tobytes()
        assert next(iter(shm_client._conns._conns.values())).mapped is not None  # the node's arena, mapped
        assert next(iter(tcp_client._conns._conns.values())).mapped is None
        assert shm_client.counters["puts.direct"] == 1
        # Clients only initiate: no listening sockets or server threads in this process.
        servers = [t.name for t in threading.enumerate() if "server" in t.name or "accept" in t.name]
        assert not servers, servers


def test_bytes_that_hash_otherwise_on_the_way_are_not_stored(cluster, monkeypatch):
    """A TCP put's writer hashes what it sends; when the node's checksum of what landed
    differs (simulated: the writer's hasher sees other bytes), that value fails, is
    revoked (the node drops it), and no client finds it; the others of the batch land."""
    from kvstore.checksum import BlockHasher

    a, b = np.full(3 << 20, 7, np.uint8), np.full(1 << 20, 9, np.uint8)
    real = BlockHasher.update

    def skewed(self: BlockHasher, data: memoryview) -> None:
        real(self, memoryview(bytes(len(data))) if self._key == b"skewed" else data)

    with Client(cluster.master_address, same_host=False) as c:
        monkeypatch.setattr(BlockHasher, "update", skewed)
        with pytest.raises(KVStoreError, match="could not be stored"):
            c.put_batch([(b"skewed", a), (b"fine", b)])
        monkeypatch.undo()
        assert c.get(b"fine") == b.tobytes()
    with Client(cluster.master_address) as other:
        assert other.get(b"skewed") is None and other.get(b"fine") == b.tobytes()
        assert other.put(b"skewed", a)  # the reservation was given back: the key can be written
        assert other.get(b"skewed") == a.tobytes()


def test_batches_prefix_and_remove(cluster):
    keys = [b"chunk-%d" % i for i in range(20)]
    with Client(cluster.master_address) as c:
        assert c.put_batch([(k, value_for(k)) for k in keys[:12]]) == [True] * 12
        assert c.longest_prefix(keys) == 12
        got = c.get_batch(keys[10:14])
        assert got[0] == value_for(keys[10]) and got[1] == value_for(keys[11])
        assert got[2] is None and got[3] is None
        assert c.remove_batch(keys[:2]) == [True, True]
        assert c.longest_prefix(keys) == 0
        assert c.exists_batch(keys[2:4]) == [True, True]


def test_killed_node_keys_become_misses_and_puts_go_elsewhere(cluster):
    with Client(cluster.master_address, timeout=5) as c:
        keys = [b"k%d" % i for i in range(30)]
        c.put_batch([(k, value_for(k)) for k in keys])
        victim = node_of(c, keys[0])
        idx = int(victim.removeprefix("node"))
        cluster.nodes[idx].signal(signal.SIGKILL)
        on_victim = [k for k in keys if node_of(c, k) == victim]
        # Reads of its keys never hang past the deadline: a miss or (before the TTL) an error.
        t = time.monotonic()
        for k in on_victim[:3]:
            try:
                assert c.get(k, timeout=3) in (None, value_for(k))
            except KVStoreError:
                pass
        assert time.monotonic() - t < 3 * 3 + 2
        deadline = time.monotonic() + 10
        while victim in cluster.live_nodes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert victim not in cluster.live_nodes()
        assert all(c.get(k) is None for k in on_victim)
        assert all(c.get(k) == value_for(k) for k in keys if k not in on_victim)
        new = [b"new%d" % i for i in range(10)]
        c.put_batch([(k, value_for(k)) for k in new])
        assert all(node_of(c, k) != victim for k in new)
        assert all(c.get(k) == value_for(k) for k in new)


def test_master_restart_finds_committed_keys(cluster):
    with Client(cluster.master_address, timeout=10) as c:
        keys = [b"m%d" % i for i in range(10)]
        c.put_batch([(k, value_for(k)) for k in keys])
    cluster.master.signal(signal.SIGKILL)
    cluster.master.popen.wait(10)
    cluster.start_master()
    with Client(cluster.master_address, timeout=10) as c:
        assert all(c.get(k) == value_for(k) for k in keys)


def test_paused_node_reregisters_keeps_its_chunks_and_serves_nothing_stale(cluster):
    with Client(cluster.master_address, timeout=5) as c:
        keys = [b"p%d" % i for i in range(20)]
        c.put_batch([(k, value_for(k)) for k in keys])
        victim = node_of(c, keys[0])
        idx = int(victim.removeprefix("node"))
        on_victim = [k for k in keys if node_of(c, k) == victim]
        cluster.nodes[idx].signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while victim in cluster.live_nodes() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert victim not in cluster.live_nodes()
        with Client(cluster.master_address, timeout=5) as fresh:  # the master does not list them meanwhile
            assert not any(fresh.exists_batch(on_victim))
        # While it is gone another client removes one of its keys and rewrites another with
        # new bytes elsewhere.
        assert c.remove(on_victim[0]) is False  # its only replica is on the dead node
        newer = b"newer-" + value_for(on_victim[1])
        c.put(on_victim[1], newer)
        cluster.nodes[idx].signal(signal.SIGCONT)
        cluster.wait_nodes(3)
        deadline = time.monotonic() + 10
        while not all(c.exists_batch(on_victim[2:])) and time.monotonic() < deadline:
            time.sleep(0.2)
        # Its chunks come back (the node re-registered what it holds)...
        assert all(c.get(k) == value_for(k) for k in on_victim[2:])
        # ...but never a stale version: the rewritten key reads the new bytes, from the new node only.
        assert c.get(on_victim[1]) == newer and node_of(c, on_victim[1]) != victim
        assert c.get(on_victim[0]) is None  # removed while it was away: never brought back


def test_bad_requests_get_clear_errors(cluster):
    with Client(cluster.master_address, timeout=5) as c:
        assert c.get(b"never-stored") is None
        with pytest.raises(InvalidArgument):
            c.put(b"", b"x")
        with pytest.raises(InvalidArgument):
            c.put(b"x" * 300, b"x")
        with pytest.raises(InvalidArgument):
            c.put(b"empty", b"")
        c.put(b"sized", b"y" * 1000)
        small = bytearray(10)
        with pytest.raises(InvalidArgument, match="smaller"):
            c.get_into(b"sized", small)
        assert small == bytearray(10)
        with pytest.raises(InvalidArgument):
            c.get_into_batch([b"sized"], [])
        assert c.get(b"sized") == b"y" * 1000  # everything still serving


def test_location_cache_skips_lookup_and_falls_back(cluster):
    keys = [b"lc%d" % i for i in range(12)]
    with Client(cluster.master_address, cache_locations=True, timeout=5) as c, \
            Client(cluster.master_address, timeout=5) as other:
        c.put_batch([(k, value_for(k)) for k in keys])
        lookups = c.stats().counters["lookups"]
        assert [bytes(v) for v in c.get_batch(keys)] == [value_for(k) for k in keys]
        assert c.counters["location_cache.hits"] == len(keys)
        assert c.stats().counters["lookups"] == lookups  # the master was not asked
        # Removed by another client: once the removal reaches the node, the cached read
        # misses on the node and the fallback Lookup says it is gone.
        other.remove(keys[0])
        deadline = time.monotonic() + 10
        while c.get(keys[0]) is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.get(keys[0]) is None
        # Its node killed: cached reads fail over to the master's view, never hang.
        victim = node_of(other, keys[1])
        cluster.nodes[int(victim.removeprefix("node"))].signal(signal.SIGKILL)
        t = time.monotonic()
        for k in keys[1:]:
            try:
                got = c.get(k, timeout=3)
            except KVStoreError:
                continue
            assert got is None or got == value_for(k)
        assert time.monotonic() - t < 3 * len(keys) + 5


def test_restarted_node_keeps_its_disk_chunks_and_forgets_the_rest(tmp_path):
    c = Cluster(tmp_path, node_ttl="3s", dram="6MiB", disk="64MiB")
    try:
        c.start(nodes=1)
        keys = [b"r%d" % i for i in range(24)]
        vals = {k: np.random.default_rng(i).bytes(1 << 20) for i, k in enumerate(keys)}
        with Client(c.master_address, timeout=10) as cl:
            for k in keys:  # 24 MiB through a 6 MiB DRAM tier: most are demoted to disk
                cl.put(k, vals[k])
            c.nodes[0].signal(signal.SIGKILL)
            c.nodes[0].popen.wait(10)
            c.start_node(0)  # same node id, same disk directory
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                s = cl.stats()
                if s.nodes and s.nodes[0].epoch > 1:
                    break
                time.sleep(0.2)
            got = {k: cl.get(k) for k in keys}
        assert all(v is None or v == vals[k] for k, v in got.items())
        found = sum(v is not None for v in got.values())
        assert 0 < found < len(keys), found  # demoted chunks survived, DRAM-only ones are gone
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


@pytest.mark.parametrize("same_host", [True, False], ids=["same-host", "tcp"])
def test_async_client(cluster, same_host):
    import asyncio

    from kvstore import AsyncClient

    async def main() -> None:
        async with AsyncClient(cluster.master_address, timeout=5, same_host=same_host) as c:
            keys = [b"as%d-%d" % (same_host, i) for i in range(8)]
            assert await c.put_batch([(k, value_for(k)) for k in keys]) == [True] * 8
            assert c.counters["puts.end_posted"] == 8
            with Client(cluster.master_address, timeout=5) as other:  # visible to others at once
                assert other.exists_batch(keys) == [True] * 8
            await c.flush()
            threads = threading.active_count()
            got = await asyncio.gather(*(c.get(k) for k in keys))
            assert [bytes(g) for g in got] == [value_for(k) for k in keys]
            assert threading.active_count() <= threads  # no thread per call (a prefault thread may end)
            assert await c.longest_prefix(keys) == 8
            buf = bytearray(len(value_for(keys[0])))
            assert await c.get_into(keys[0], buf) == len(buf) and bytes(buf) == value_for(keys[0])
            # batched and ranged, a key repeated
            v1 = value_for(keys[1])
            parts = [bytearray(10), bytearray(len(v1))]
            assert await c.get_into_batch([keys[1], keys[1]], parts, ranges=[[(5, 10)], None]) == [10, len(v1)]
            assert bytes(parts[0]) == v1[5:15] and bytes(parts[1]) == v1
            assert (c.counters["hits.one_sided"] > 0) == same_host
            assert len((await c.stats()).nodes) == 3
            assert await c.exists_batch(keys[:2]) == [True, True]
            assert await c.remove(keys[0]) and not await c.exists(keys[0])
            assert await c.get(keys[0]) is None

    asyncio.run(main())


@pytest.mark.parametrize("same_host", [True, False], ids=["same-host", "tcp"])
def test_a_returned_put_is_visible_to_every_client_at_once(cluster, same_host):
    """A put's PutEnd is posted, not awaited (one master round trip on its path); still,
    once ``put`` returned, the writer and any other client find the key."""
    with Client(cluster.master_address, timeout=10, same_host=same_host) as writer, \
            Client(cluster.master_address, timeout=10, cache_locations=False) as reader:
        for i in range(150):
            k = b"vis%d-%d" % (same_host, i)
            assert writer.put(k, value_for(k))
            assert reader.exists(k), i  # another client, through the master
            assert writer.longest_prefix([k]) == 1  # the writer's own metadata call
            if i % 10 == 0:
                assert reader.get(k) == value_for(k)
        assert writer.counters["puts.end_posted"] == 150
        writer.flush()  # every PutEnd was answered OK
        assert writer.counters["puts.lost"] == 0
        # Writing a key again right after its put (its PutEnd may be unanswered): no BUSY.
        for i in range(20):
            k = b"again%d-%d" % (same_host, i)
            assert writer.put(k, value_for(k)) and not writer.put(k, value_for(k))


def test_a_put_end_the_master_never_read_is_raised_by_flush(cluster, monkeypatch):
    """The master is stopped right after the value was committed on its node, so the
    posted PutEnd sits unread; killed, it never applies it: ``put`` had returned, and
    ``flush`` says the put was lost (the location cache forgets it too)."""
    master = cluster.master
    with Client(cluster.master_address, timeout=5, same_host=False) as c:
        assert c.put(b"before", value_for(b"before"))
        original = Client._write_node_flow

        def then_stop_the_master(self, *args, **kwargs):
            failed = yield from original(self, *args, **kwargs)
            master.signal(signal.SIGSTOP)
            return failed

        monkeypatch.setattr(Client, "_write_node_flow", then_stop_the_master)
        assert c.put(b"lost", value_for(b"lost"))  # returned: committed on the node, PutEnd posted
        monkeypatch.undo()
        assert c._locations is not None and c._locations.get(b"lost") is not None
        master.signal(signal.SIGKILL)
        master.popen.wait(10)
        with pytest.raises(TryAgain, match="did not become visible"):
            c.flush()
        assert c.counters["puts.lost"] == 1
        assert c._locations.get(b"lost") is None
        c.flush()  # raised once
