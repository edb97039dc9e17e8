"""TLS on the master (gRPC and framed channel) and the nodes' control channels, with
certificates from `kvstore auth init --tls`, run as `kvstore up --tls-dir` (real processes)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.auth import init
from kvstore.client import AsyncClient, Client
from kvstore.errors import KVStoreError
from kvstore.node.control import ControlClient
from kvstore.node.protocol import Op
from kvstore.testing.cluster import CLI, Proc, free_port
from kvstore.tls import make

ROOT = Path(__file__).resolve().parents[2]
VALUE = os.urandom(3 << 20)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("tls")
    init(tmp / "auth")
    make(tmp / "auth" / "tls", [])
    port = free_port()
    p = Proc("up", [*CLI, "up", "--port", str(port), "--data-dir", str(tmp / "kv"), "--dram", "64MiB",
                    "--disk", "0", "--metrics-port", "-1", "--tls-dir", str(tmp / "auth")],
             tmp / "up.log").start({**os.environ, "PYTHONPATH": str(ROOT)})
    address, ca = f"127.0.0.1:{port}", tmp / "auth" / "tls" / "ca.pem"
    deadline = time.monotonic() + 30
    while True:
        try:
            with Client(address, tls_ca=str(ca), timeout=2) as c:
                if c.stats().nodes:
                    break
        except KVStoreError:
            assert p.alive(), (tmp / "up.log").read_text()
        assert time.monotonic() < deadline, (tmp / "up.log").read_text()
        time.sleep(0.2)
    try:
        yield address, ca
    finally:
        p.stop()


def test_put_get_over_tls_same_host_and_network(up: tuple[str, Path]) -> None:
    address, ca = up
    with Client(address, tls_ca=str(ca)) as c, Client(address, tls_ca=str(ca), same_host=False) as net:
        assert c.put(b"tls-a", VALUE)
        assert net.put(b"tls-b", VALUE[::-1])
        assert bytes(net.get(b"tls-a") or b"") == VALUE
        assert bytes(c.get(b"tls-b") or b"") == VALUE[::-1]
        assert c.longest_prefix([b"tls-a", b"tls-b", b"nope"]) == 2


def test_plaintext_and_unknown_certificates_are_refused(up: tuple[str, Path], tmp_path: Path) -> None:
    address, ca = up
    with Client(address, timeout=2, retries=0) as plain, pytest.raises(KVStoreError):
        plain.stats()  # gRPC without TLS against a TLS port
    other = make(tmp_path / "other", [])  # a CA that did not sign the server's certificate
    with Client(address, tls_ca=str(other["ca"]), timeout=2, retries=0) as c, pytest.raises(KVStoreError):
        c.stats()
    with Client(address, tls_ca=str(ca)) as c:
        node = c.stats().nodes[0].control_address
    plain_ctl = ControlClient(node)  # speaks plain frames to a TLS listener: no service
    try:
        with pytest.raises(KVStoreError):
            plain_ctl.call(Op.ACQUIRE, [b"tls-a"], 3)
    finally:
        plain_ctl.close()


def test_async_client_over_tls(up: tuple[str, Path]) -> None:
    import asyncio

    address, ca = up

    async def run() -> tuple[bytes | None, bytes | None]:
        async with AsyncClient(address, tls_ca=str(ca)) as c, \
                AsyncClient(address, tls_ca=str(ca), same_host=False) as net:
            await net.put(b"tls-async", VALUE[:100_000])
            a = await c.get(b"tls-async")
            b = await net.get(b"tls-a")
            return (None if a is None else bytes(a)), (None if b is None else bytes(b))

    a, b = asyncio.run(run())
    assert a == VALUE[:100_000] and b == VALUE


def test_tcp_transport_over_tls(tmp_path: Path) -> None:
    """The transfer engine's tcp:// with TLS: a verified peer reads and writes; a plaintext
    or wrongly-verified one gets nothing."""
    import numpy as np

    from kvstore.tls import client_context, server_context
    from transport.base import TransportOptions
    from transport.regions import Desc
    from transport.registry import create

    files = make(tmp_path / "tls", [])
    server = create("tcp://127.0.0.1:0", TransportOptions(tls_server=server_context(files["cert"], files["key"])))
    region = server.allocate(1 << 20, name="served")
    assert region.view is not None
    src = np.frombuffer(region.view, dtype=np.uint8)
    src[:] = np.arange(1 << 20, dtype=np.uint64).astype(np.uint8)
    client = create("tcp://127.0.0.1:0", TransportOptions(listen=False, tls_client=client_context(files["ca"])))
    try:
        peer = client.connect(server.metadata(), timeout=10)
        local = client.allocate(1 << 20, name="local")
        client.read(peer, [Desc(local, 0, region.remote(), 0, 1 << 20)], timeout=10, checksum=True).wait()
        assert local.view is not None and bytes(local.view) == bytes(region.view)
        plain = create("tcp://127.0.0.1:0", TransportOptions(listen=False))
        try:
            with pytest.raises(KVStoreError):
                p = plain.connect(server.metadata(), timeout=3)
                buf = plain.allocate(4096, name="steal")
                plain.read(p, [Desc(buf, 0, region.remote(), 0, 4096)], timeout=3).wait()
        finally:
            plain.close()
    finally:
        client.close()
        server.close()
