"""CUDA buffers in the SDK (kvstore.client.device) against a real master and node.

Without a GPU the client's device logic runs on host memory posing as device memory
(kvstore.testing.fake_cuda): which path each byte takes (DMA straight out of or into
the mapped arena on the same host, pinned staging across hosts), that a device
buffer only ever receives verified bytes, and the argument checks. The same tests
with real CUDA tensors and the CuPy copier are marked ``gpu`` (below).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvstore import AsyncClient
from kvstore.client import Client
from kvstore.errors import InvalidArgument
from kvstore.testing.cluster import Cluster
from kvstore.testing.fake_cuda import FakeCudaArray, HostCopier

pytestmark = pytest.mark.timeout(120)
SIZE = (1 << 20) + 12345  # a partial last checksum block


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("dev"), dram="64MiB")
    try:
        yield c.start(nodes=1)
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.stop()


def value(seed: int, n: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def client(cluster: Cluster, **kw: Any) -> tuple[Client, HostCopier]:
    c = Client(cluster.master_address, timeout=10, **kw)
    copier = HostCopier()
    c.copier = copier
    return c, copier


def arena_of(c: Client) -> memoryview:
    (conn,) = c._conns._conns.values()
    assert conn.mapped is not None
    return conn.mapped.arena


def test_same_host_moves_device_bytes_straight_through_the_arena(cluster: Cluster) -> None:
    v = value(1)
    src = FakeCudaArray(SIZE)
    src.host[:] = v
    w, wcopy = client(cluster)
    with w:
        assert w.put_from(b"dev-1", src)
        arena = arena_of(w)
        # DMA'd into its extent of the mapped arena (page-locked once), hashed there: no staging
        assert wcopy.staged == 0 and len(wcopy.registered) == 1
        assert all(wcopy.within(a, arena) for a, _ in wcopy.to_host_into)
        assert w.get(b"dev-1") == v.tobytes()  # and the host path reads what landed
    r, rcopy = client(cluster)
    with r:
        dst = FakeCudaArray(SIZE + 100, fill=7)
        assert r.get_into(b"dev-1", dst) == SIZE  # Lookup, ACQUIRE, DMA out of the arena
        assert dst.tobytes()[:SIZE] == v.tobytes() and set(dst.host[SIZE:]) == {7}
        dst2 = FakeCudaArray(SIZE)
        assert r.get_into(b"dev-1", dst2) == SIZE  # cached location: one-sided
        assert r.counters["hits.one_sided"] == 1 and dst2.tobytes() == v.tobytes()
        arena = arena_of(r)
        assert rcopy.staged == 0 and all(rcopy.within(a, arena) for a, _ in rcopy.to_device_from)
        assert len(rcopy.registered) == 1  # once per mapping
        # ranges land back to back, each verified against the block sums
        parts = FakeCudaArray(1000 + 5000)
        assert r.get_into(b"dev-1", parts, ranges=[(5, 1000), (SIZE - 5000, 5000)]) == 6000
        assert parts.tobytes() == v[5:1005].tobytes() + v[SIZE - 5000:].tobytes()
        # a batch mixing host and device buffers
        host = bytearray(SIZE)
        dev = FakeCudaArray(SIZE)
        assert r.get_into_batch([b"dev-1", b"dev-1"], [host, dev]) == [SIZE, SIZE]
        assert bytes(host) == v.tobytes() == dev.tobytes()


def test_other_hosts_go_through_pinned_staging(cluster: Cluster) -> None:
    v = value(2)
    src = FakeCudaArray(SIZE)
    src.host[:] = v
    c, copier = client(cluster, same_host=False)
    with c:
        assert c.put_from(b"dev-2", src)
        assert copier.staged == 1 and not copier.registered
        dst = FakeCudaArray(SIZE)
        assert c.get_into(b"dev-2", dst) == SIZE
        assert copier.staged == 2 and dst.tobytes() == v.tobytes()
        parts = FakeCudaArray(300)
        assert c.get_into(b"dev-2", parts, ranges=[(SIZE - 300, 300)]) == 300
        assert parts.tobytes() == v[SIZE - 300:].tobytes()
    with Client(cluster.master_address, timeout=10) as plain:  # what landed is the value
        assert plain.get(b"dev-2") == v.tobytes()


@pytest.mark.parametrize("same_host", [True, False], ids=["same-host", "tcp"])
def test_a_corrupt_value_never_reaches_the_device_buffer(cluster: Cluster, same_host: bool) -> None:
    key = b"dev-bad-%d" % same_host
    v = value(3)
    w, _ = client(cluster)
    with w:
        assert w.put(key, v)
        known = w._locations.get(key) if w._locations is not None else None
        assert known is not None
        arena_of(w)[known.offset + 777] ^= 0xFF  # the bytes rot in the node's memory
    r, _ = client(cluster, same_host=same_host)
    with r:
        dst = FakeCudaArray(SIZE, fill=9)
        assert r.get_into(key, dst) is None  # a miss
        assert r.counters["misses.corrupt"] >= 1
        if same_host:  # verified in the arena before any DMA: the buffer was never written
            assert set(dst.host) == {9}


def test_bad_device_buffers_are_refused_before_anything_moves(cluster: Cluster) -> None:
    c, copier = client(cluster)
    with c:
        assert c.put(b"dev-4", value(4))
        with pytest.raises(InvalidArgument, match="read-only"):
            c.get_into(b"dev-4", FakeCudaArray(SIZE, readonly=True))
        with pytest.raises(InvalidArgument, match="smaller than the value"):
            c.get_into(b"dev-4", FakeCudaArray(SIZE - 1))
        strided = FakeCudaArray(2 * SIZE)
        iface = dict(strided.__cuda_array_interface__, shape=(SIZE,), strides=(2,))

        class Strided:
            __cuda_array_interface__ = iface

        with pytest.raises(InvalidArgument, match="contiguous"):
            c.get_into(b"dev-4", Strided())
        with pytest.raises(InvalidArgument, match="contiguous"):
            c.put_from(b"dev-5", Strided())
        assert not copier.to_device_from and not c.exists(b"dev-5")


def test_async_client_takes_device_buffers(cluster: Cluster) -> None:
    v = value(6)

    async def main() -> None:
        async with AsyncClient(cluster.master_address, timeout=10) as c:
            c.copier = HostCopier()
            src = FakeCudaArray(SIZE)
            src.host[:] = v
            assert await c.put_from(b"dev-6", src)
            dst = FakeCudaArray(SIZE)
            assert await c.get_into(b"dev-6", dst) == SIZE
            assert dst.tobytes() == v.tobytes()

    asyncio.run(main())


@pytest.mark.gpu
@pytest.mark.parametrize("same_host", [True, False], ids=["same-host", "tcp"])
def test_cuda_tensors_round_trip(cluster: Cluster, same_host: bool) -> None:
    """Real CUDA memory, the CuPy copier: put from a torch CUDA tensor, read into a CuPy
    array and a torch tensor (whole and ranged)."""
    torch = pytest.importorskip("torch")
    cp = pytest.importorskip("cupy")
    v = value(7)
    with Client(cluster.master_address, timeout=30, same_host=same_host) as c:
        src = torch.from_numpy(v).cuda()
        key = b"cuda-%d" % same_host
        assert c.put_from(key, src)
        assert c.get(key) == v.tobytes()
        dst = cp.zeros(SIZE, dtype=cp.uint8)
        assert c.get_into(key, dst) == SIZE
        assert cp.asnumpy(dst).tobytes() == v.tobytes()
        part = torch.zeros(4096, dtype=torch.uint8, device="cuda")
        assert c.get_into(key, part, ranges=[(SIZE - 4096, 4096)]) == 4096
        assert part.cpu().numpy().tobytes() == v[SIZE - 4096:].tobytes()
