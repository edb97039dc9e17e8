"""Contract suite: every backend, two real processes on loopback."""

from __future__ import annotations

import asyncio
import os
import random

import numpy as np
import pytest
from conftest import PeerProcess, pattern

from kvstore.checksum import checksum
from kvstore.errors import InvalidArgument
from transport.base import Peer, Transport
from transport.layerwise import LayerSender
from transport.regions import Desc

pytestmark = pytest.mark.timeout(120)

Pair = tuple[Transport, Peer, PeerProcess]


def _local(t: Transport, n: int, salt: int = 7) -> tuple[np.ndarray, Desc]:
    r = t.allocate(n, name=f"local-{n}")
    assert r.view is not None
    arr = np.frombuffer(r.view, dtype=np.uint8)
    arr[:] = pattern(n, salt)
    return arr, r  # type: ignore[return-value]


@pytest.mark.parametrize("size", [1, 4097, (1 << 20) + 3, 16 << 20])
def test_write_then_read_back(pair: Pair, size: int) -> None:
    t, peer, proc = pair
    arr, r = _local(t, size)
    off = 12345 if size < (16 << 20) else 0
    t.write(peer, [Desc(r, 0, proc.region, off, size)], timeout=30).wait()
    assert proc.sum(off, size) == checksum(arr)
    want = arr.copy()
    arr[:] = 0
    t.read(peer, [Desc(r, 0, proc.region, off, size)], timeout=30, checksum=True).wait()
    assert np.array_equal(arr, want)
    t.deregister(r)
    assert proc.cmd("fill") == "ok"


@pytest.mark.slow
def test_256_mib(pair: Pair) -> None:
    t, peer, proc = pair
    n = 256 << 20
    arr, r = _local(t, n, salt=3)
    t.write(peer, [Desc(r, 0, proc.region, 0, n)], timeout=60).wait()
    assert proc.sum(0, n) == checksum(arr)
    arr[:] = 0
    assert t.read(peer, [Desc(r, 0, proc.region, 0, n)], timeout=60).result() == n
    assert checksum(arr) == proc.sum(0, n)
    t.deregister(r)
    assert proc.cmd("fill") == "ok"


def test_many_descriptors_per_batch(pair: Pair) -> None:
    t, peer, proc = pair
    rng = random.Random(5)
    n = 4 << 20
    arr, r = _local(t, n, salt=11)
    descs, pos = [], 0
    while len(descs) < 2000:
        ln = rng.randint(1, 2000)
        descs.append(Desc(r, pos, proc.region, pos * 2, ln))
        pos += ln + rng.randint(0, 7)
    t.write(peer, descs, timeout=30, checksum=True).wait()
    for d in descs[:: 97]:
        assert proc.sum(d.remote_offset, d.length) == checksum(arr[d.local_offset : d.local_offset + d.length])
    arr[:] = 0
    t.read(peer, descs, timeout=30).wait()
    for d in descs[:: 89]:
        assert proc.sum(d.remote_offset, d.length) == checksum(arr[d.local_offset : d.local_offset + d.length])
    t.deregister(r)
    assert proc.cmd("fill") == "ok"


def test_concurrent_batches_awaited(pair: Pair) -> None:
    t, peer, proc = pair
    k, n = 8, 3 << 20
    arr, r = _local(t, k * n)
    want = pattern(k * n)  # the peer's pattern, read into disjoint slices at once

    async def run() -> list[int]:
        hs = [t.read(peer, [Desc(r, i * n, proc.region, i * n, n)], timeout=30) for i in range(k)]
        return list(await asyncio.gather(*hs))

    assert asyncio.run(run()) == [n] * k
    assert np.array_equal(arr, want)
    t.deregister(r)


def test_polling_handles(pair: Pair) -> None:
    t, peer, proc = pair
    arr, r = _local(t, 8 << 20)
    h = t.read(peer, [Desc(r, 0, proc.region, 0, 8 << 20)], timeout=30)
    states = set()
    while not h.done():
        states.add(h.poll())
    assert states <= {"pending", "done"}
    assert h.poll() == "done" and h.exception() is None
    t.deregister(r)


def test_notify_follows_data(pair: Pair) -> None:
    t, peer, proc = pair
    arr, r = _local(t, 2 << 20, salt=9)
    tag = os.urandom(8)
    t.write(peer, [Desc(r, 0, proc.region, 0, 2 << 20)], timeout=30, notify=tag).wait()
    assert proc.cmd("wait", tag.hex(), 10) == "ok"
    assert proc.sum(0, 2 << 20) == checksum(arr)
    t.notify(peer, b"plain", timeout=10).wait()
    assert proc.cmd("wait", b"plain".hex(), 10) == "ok"
    assert proc.cmd("wait", b"never".hex(), 0.2) == "timeout"
    t.deregister(r)
    assert proc.cmd("fill") == "ok"


def test_layerwise_out_of_order(pair: Pair) -> None:
    t, peer, proc = pair
    chunks, layers, per = 4, 12, 64 << 10
    arr, r = _local(t, chunks * layers * per, salt=5)
    stream = os.urandom(16)

    def range_of(c: int, layer: int) -> Desc:
        off = (c * layers + layer) * per
        return Desc(r, off, proc.region, off, per)

    tx = LayerSender(t, peer, stream, chunks, layers, range_of, max_in_flight=4 * per, timeout=30)
    order = [(c, layer) for c in range(chunks) for layer in range(layers)]
    random.Random(3).shuffle(order)
    assert proc.proc.stdin is not None
    proc.proc.stdin.write(f"layers {stream.hex()} {layers} 30\n")
    proc.proc.stdin.flush()
    for c, layer in order:
        tx.publish(c, layer)
    with pytest.raises(InvalidArgument):
        tx.publish(*order[0])
    tx.finish(30)
    assert proc._line().strip() == "ok"
    assert proc.sum(0, arr.size) == checksum(arr)
    t.deregister(r)
    assert proc.cmd("fill") == "ok"


def test_bad_descriptors_rejected_at_post(pair: Pair) -> None:
    t, peer, proc = pair
    arr, r = _local(t, 4096)
    with pytest.raises(InvalidArgument):
        t.write(peer, [Desc(r, 0, proc.region, proc.region.nbytes - 10, 11)])
    with pytest.raises(InvalidArgument):
        t.read(peer, [Desc(r, 4000, proc.region, 0, 97)])
    with pytest.raises(InvalidArgument):
        t.read(peer, [])
    t.deregister(r)
    with pytest.raises(InvalidArgument):
        t.read(peer, [Desc(r, 0, proc.region, 0, 1)])
