"""In-process tests: registry, wire format, handles, fault wrapper, layer-wise streams."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest

from kvstore.errors import InvalidArgument, Timeout, TransportError
from transport.base import Transport
from transport.handle import Cancelled, Handle
from transport.layerwise import LayerReceiver, LayerSender
from transport.regions import Desc, RemoteRegion
from transport.registry import create, register_backend, schemes
from transport.testing.faults import FaultPlan, FaultyTransport
from transport.testing.inproc import InprocTransport
from transport.wire import Malformed, pack_header, parse_header

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def two() -> tuple[Transport, Transport]:
    a = create(f"inproc://a-{os.urandom(3).hex()}")
    b = create(f"inproc://b-{os.urandom(3).hex()}")
    yield a, b
    a.close()
    b.close()


def test_registry() -> None:
    assert {"tcp", "shm", "ucx", "inproc"} <= set(schemes())
    with pytest.raises(InvalidArgument):
        create("nope://x")
    with pytest.raises(InvalidArgument):
        create("no-scheme")

    class Custom(InprocTransport):
        scheme = "custom"

    register_backend("custom", Custom)
    t = create("custom://c1")
    assert t.capabilities.in_process
    t.close()


def test_capabilities_declared() -> None:
    from transport.registry import backend_class  # noqa: PLC0415

    assert backend_class("shm").capabilities.same_host_only
    assert backend_class("tcp").capabilities.remote
    assert not backend_class("tcp").capabilities.device_memory


def test_wire_rejects() -> None:
    with pytest.raises(Malformed):
        parse_header(b"x" * 24)
    with pytest.raises(Malformed):
        parse_header(pack_header(1, 0, 0, 1 << 20, 0))
    with pytest.raises(Malformed):
        parse_header(pack_header(77, 0, 0, 0, 0))
    assert parse_header(pack_header(1, 0, 9, 3, 4)).req_id == 9
    with pytest.raises(InvalidArgument):
        RemoteRegion.from_bytes(b"short")
    rr = RemoteRegion(3, 100, b"ab")
    assert RemoteRegion.from_bytes(rr.to_bytes()) == rr


def test_register_any_buffer(two: tuple[Transport, Transport]) -> None:
    a, b = two
    from kvstore.memory import Arena  # noqa: PLC0415

    with Arena(1 << 20, pin="off") as arena:
        alloc = arena.alloc(8192)
        ra = a.register(alloc.view(), name="arena")
        rb = b.register(np.zeros(8192, dtype=np.uint8))
        alloc.view()[:] = b"\x07" * 8192
        p = a.connect(b.metadata())
        a.write(p, [Desc(ra, 0, rb.remote(), 0, 8192)], timeout=5).wait()
        assert bytes(rb.view or b"") == b"\x07" * 8192
        a.deregister(ra)
        alloc.release()
    with pytest.raises(InvalidArgument):
        a.register(b"read-only bytes")
    with pytest.raises(InvalidArgument):
        a.register(np.zeros((4, 4))[:, 1])


def test_handle_callbacks_and_await() -> None:
    h = Handle("op", 5, None)
    seen: list[str] = []
    h.add_done_callback(lambda x: seen.append(x.poll()))

    async def main() -> int:
        threading.Timer(0.05, h._part_done).start()
        return await h

    assert asyncio.run(main()) == 5
    assert seen == ["done"]
    h2 = Handle("op", 0, None)
    h2._part_done(TransportError("boom"))
    assert h2.poll() == "failed"
    with pytest.raises(TransportError):
        h2.wait()


def test_fault_drop_times_out(two: tuple[Transport, Transport]) -> None:
    a, b = two
    fa = FaultyTransport(a, FaultPlan(drop=True))
    ra, rb = fa.allocate(100), b.allocate(100)
    p = fa.connect(b.metadata())
    t0 = time.monotonic()
    with pytest.raises(Timeout):
        fa.write(p, [Desc(ra, 0, rb.remote(), 0, 100)], timeout=0.2).wait(5)
    assert time.monotonic() - t0 < 2
    h = fa.notify(p, b"x", timeout=0.1)
    with pytest.raises(Timeout):
        h.wait(5)


def test_fault_delay_cancel(two: tuple[Transport, Transport]) -> None:
    a, b = two
    fa = FaultyTransport(a, FaultPlan(delay=5.0))
    ra, rb = fa.allocate(100), b.allocate(100)
    p = fa.connect(b.metadata())
    h = fa.write(p, [Desc(ra, 0, rb.remote(), 0, 100)])
    assert h.cancel()
    with pytest.raises(Cancelled):
        h.wait(2)
    assert not h.cancel()


def test_fault_truncate_and_budget(two: tuple[Transport, Transport]) -> None:
    a, b = two
    src = a.allocate(1000)
    assert src.view is not None
    src.view[:] = b"\x05" * 1000
    rb = b.allocate(1000)
    assert rb.view is not None
    fa = FaultyTransport(a, FaultPlan(truncate=True))
    p = fa.connect(b.metadata())
    with pytest.raises(TransportError):
        fa.write(p, [Desc(src, 0, rb.remote(), 0, 1000)], timeout=5, notify=b"n").wait()
    assert bytes(rb.view[:500]) == b"\x05" * 500 and bytes(rb.view[500:]) == bytes(500)
    assert not b.notifications.try_take(b"n"), "a truncated write must not notify"
    fb = FaultyTransport(a, FaultPlan(fail_after_bytes=1500))
    fb.write(p, [Desc(src, 0, rb.remote(), 0, 1000)], timeout=5).wait()
    with pytest.raises(TransportError):
        fb.write(p, [Desc(src, 0, rb.remote(), 0, 1000)], timeout=5).wait()


def test_layerwise_each_layer_once_and_alone(two: tuple[Transport, Transport]) -> None:
    a, b = two
    chunks, layers, per = 3, 5, 4096
    src = a.allocate(chunks * layers * per)
    dst = b.allocate(chunks * layers * per)
    p = a.connect(b.metadata())
    stream = os.urandom(16)

    def rng(c: int, layer: int) -> Desc:
        off = (c * layers + layer) * per
        return Desc(src, off, dst.remote(), off, per)

    tx = LayerSender(a, p, stream, chunks, layers, rng, max_in_flight=per)
    rx = LayerReceiver(b, stream, layers)
    for c in range(chunks):
        tx.publish(c, 3)
    rx.wait_layer(3, 5)  # layer 3 alone, before any other layer exists
    with pytest.raises(Timeout):
        rx.wait_layer(0, 0.1)
    for c in reversed(range(chunks)):
        for layer in (4, 0, 2, 1):
            tx.publish(c, layer)
    tx.finish(5)

    async def rest() -> None:
        await asyncio.gather(*(rx.layer(layer, 5) for layer in (0, 1, 2, 4)))

    asyncio.run(rest())
    with pytest.raises(InvalidArgument):
        rx.wait_layer(3, 0.1)
    with pytest.raises(InvalidArgument):
        tx.publish(0, 0)
    with pytest.raises(InvalidArgument):
        tx.publish(9, 0)


def test_layerwise_backpressure_bounds_in_flight(two: tuple[Transport, Transport]) -> None:
    a, b = two
    src, dst = a.allocate(1 << 20), b.allocate(1 << 20)
    fa = FaultyTransport(a, FaultPlan(delay=0.05))
    p = fa.connect(b.metadata())
    seen: list[int] = []

    class Probe(LayerSender):
        def _landed_one(self, layer: int, nbytes: int, h: Handle) -> None:
            seen.append(self._in_flight)
            super()._landed_one(layer, nbytes, h)

    per = 64 << 10
    tx = Probe(fa, p, os.urandom(16), 1, 16, lambda c, layer: Desc(src, layer * per, dst.remote(), layer * per, per),
               max_in_flight=2 * per)
    for layer in range(16):
        tx.publish(0, layer)
    tx.finish(10)
    assert max(seen) <= 2 * per


def test_layerwise_error_surfaces(two: tuple[Transport, Transport]) -> None:
    a, b = two
    src, dst = a.allocate(4096), b.allocate(4096)
    fa = FaultyTransport(a, FaultPlan(truncate=True))
    p = fa.connect(b.metadata())
    tx = LayerSender(fa, p, os.urandom(16), 1, 2, lambda c, layer: Desc(src, layer * 2048, dst.remote(), layer * 2048, 2048))
    tx.publish(0, 0)
    with pytest.raises(TransportError):
        tx.finish(5)
