"""TLS on the master (gRPC and framed channel) and the nodes' control channels, with
certificates from `kvstore auth init --tls`, run as `kvstore up --tls-dir` (real processes)."""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.auth import init
from kvstore.client import AsyncClient, Client
from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.node.control import ControlClient
from kvstore.node.protocol import Op
from kvstore.testing.cluster import CLI, Proc, free_port
from kvstore.tls import client_context, make

ROOT = Path(__file__).resolve().parents[2]
VALUE = os.urandom(3 << 20)


def _up(tmp: Path, *flags: str) -> tuple[Proc, str]:
    """`kvstore up --tls-dir` with ``flags``, once its node has registered."""
    init(tmp / "auth")
    tls = make(tmp / "auth" / "tls", [])
    port = free_port()
    p = Proc("up", [*CLI, "up", "--port", str(port), "--data-dir", str(tmp / "kv"), "--dram", "64MiB",
                    "--disk", "0", "--metrics-port", "-1", "--tls-dir", str(tmp / "auth"), *flags],
             tmp / "up.log").start({**os.environ, "PYTHONPATH": str(ROOT)})
    address = f"127.0.0.1:{port}"
    mine = {"tls_cert": str(tls["client_cert"]), "tls_key": str(tls["client_key"])} if flags else {}
    deadline = time.monotonic() + 30
    while True:
        try:
            with Client(address, tls_ca=str(tls["ca"]), timeout=2, **mine) as c:
                if c.stats().nodes:  # with --mtls: the node presented its certificate to the master
                    return p, address
        except KVStoreError:
            assert p.alive(), (tmp / "up.log").read_text()
        assert time.monotonic() < deadline, (tmp / "up.log").read_text()
        time.sleep(0.2)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("tls")
    p, address = _up(tmp)
    try:
        yield address, tmp / "auth" / "tls" / "ca.pem"
    finally:
        p.stop()


def _refused(address: str, ctx: ssl.SSLContext) -> bool:
    """Whether a TLS listener hangs up on a peer with ``ctx``. TLS 1.3 finishes the client's
    side of the handshake first, so the refusal (an alert, or the close) arrives with the
    first read; a listener that accepted us sends its own opening (HTTP/2 settings) or
    waits for a request."""
    host, _, port = address.rpartition(":")
    ctx.set_alpn_protocols(["h2"])  # gRPC hangs up on TLS peers that do not offer HTTP/2; others ignore it
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=host) as s:
            s.settimeout(1.0)
            try:
                return s.recv(1) == b""
            except TimeoutError:
                return False
    except (ssl.SSLError, ConnectionError):
        return True


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


def test_mutual_tls(tmp_path: Path) -> None:
    """`kvstore up --tls-dir --mtls`: the master's gRPC port and framed channel and the node's
    control channel serve only peers with a certificate the CA signed; the node itself
    registers with its own; a client with the client certificate works on both paths."""
    p, address = _up(tmp_path, "--mtls")
    tls = tmp_path / "auth" / "tls"
    ca, cert, key = str(tls / "ca.pem"), str(tls / "client.pem"), str(tls / "client.key")
    try:
        with Client(address, tls_ca=ca, tls_cert=cert, tls_key=key) as c, \
                Client(address, tls_ca=ca, tls_cert=cert, tls_key=key, same_host=False) as net:
            assert c.put(b"mtls-a", VALUE)
            assert net.put(b"mtls-b", VALUE[::-1])
            assert bytes(net.get(b"mtls-a") or b"") == VALUE
            assert bytes(c.get(b"mtls-b") or b"") == VALUE[::-1]
            stats = c.stats()
            node = stats.nodes[0].control_address
            fast = c._fast.address if c._fast is not None else None
        assert fast is not None, "the client should have used the master's framed channel"
        # without a client certificate: the CA verifies the server, but the server refuses us
        with Client(address, tls_ca=ca, timeout=2, retries=0) as anon, pytest.raises(KVStoreError):
            anon.stats()
        other = make(tmp_path / "other", [])  # a client certificate from a CA the servers do not trust
        with Client(address, tls_ca=ca, tls_cert=str(other["client_cert"]), tls_key=str(other["client_key"]),
                    timeout=2, retries=0) as foreign, pytest.raises(KVStoreError):
            foreign.stats()
        for listener in (address, fast, node):
            assert _refused(listener, client_context(ca)), listener
            assert _refused(listener, client_context(ca, other["client_cert"], other["client_key"])), listener
            assert not _refused(listener, client_context(ca, cert, key)), listener
        anon_ctl = ControlClient(node, tls=client_context(ca))
        try:
            with pytest.raises(KVStoreError):
                anon_ctl.call(Op.ACQUIRE, [b"mtls-a"], 3)
        finally:
            anon_ctl.close()
        with Client(address, tls_ca=ca, tls_cert=cert, tls_key=key) as c:
            assert bytes(c.get(b"mtls-a") or b"") == VALUE  # still served, unchanged
    finally:
        p.stop()


def test_certificate_identities(tmp_path: Path) -> None:
    """Under mutual TLS, a client certificate naming a tenant (`kvstore auth add-tenant --tls`)
    stands in for the tenant's token on the master (gRPC and framed channel) and on the
    node's control channel: the tenant's keys, and only them; an admin certificate is an
    admin; a certificate naming a tenant the master does not hold is refused."""
    import subprocess
    import sys

    from kvstore.errors import PermissionDenied
    from kvstore.node.control import FetchRequest
    from kvstore.tls import issue

    auth = tmp_path / "auth"
    entry = [sys.executable, "-c", "from kvstore.cli import main; main()"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["auth", "init", str(auth), "--tenant", "alpha", "--tls"], ["auth", "add-tenant", str(auth), "beta",
                                                                          "--tls"]):
        r = subprocess.run([*entry, *args], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
    tls = auth / "tls"
    ghost, ghost_key = issue(tls, tmp_path / "ghost", "client", "ghost")  # CA-signed, unknown tenant
    ca, srv, srv_key = str(tls / "ca.pem"), str(tls / "server.pem"), str(tls / "server.key")
    port = free_port()
    master = Proc("master", [*CLI, "master", "--port", str(port), "--metrics-port", "-1", "--auth-dir", str(auth),
                             "--tls-cert", srv, "--tls-key", srv_key, "--tls-client-ca", ca],
                  tmp_path / "master.log").start(env)
    address = f"127.0.0.1:{port}"
    node = Proc("node", [*CLI, "node", "--master", address, "--node-id", "n1", "--dram", "64MiB",
                         "--transport", "shm://", "--metrics-port", "-1", "--token-file", str(auth / "node.token"),
                         "--tls-cert", srv, "--tls-key", srv_key, "--tls-ca", ca, "--tls-client-ca", ca],
                tmp_path / "node.log").start(env)

    def as_(who: str, **kw: object) -> Client:
        return Client(address, tls_ca=ca, tls_cert=str(tls / f"{who}.pem"), tls_key=str(tls / f"{who}.key"),
                      timeout=5, **kw)  # type: ignore[arg-type]

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with as_("admin") as adm:  # an admin by certificate, no token
                    if adm.stats().nodes:
                        break
            except KVStoreError:
                assert master.alive() and node.alive(), (tmp_path / "node.log").read_text()[-2000:]
            assert time.monotonic() < deadline, (tmp_path / "master.log").read_text()[-2000:]
            time.sleep(0.2)
        with as_("tenants/alpha") as a, as_("tenants/alpha", same_host=False) as a_net, as_("tenants/beta") as b:
            assert a.put(b"doc", VALUE) and a_net.put(b"net", VALUE[::-1])
            assert bytes(a_net.get(b"doc") or b"") == VALUE  # the node's control channel, by certificate
            assert bytes(a.get(b"net") or b"") == VALUE[::-1]
            assert a._fast is not None  # the framed channel took the certificate too
            assert b.get(b"doc") is None and b.longest_prefix([b"doc"]) == 0  # beta never sees alpha's keys
            assert b.put(b"doc", VALUE[:100])
            assert bytes(a.get(b"doc") or b"") == VALUE and bytes(b.get(b"doc") or b"") == VALUE[:100]
            with as_("admin") as adm:
                assert bytes(adm.get(b"@alpha/doc") or b"") == VALUE  # the stored key: the tenant's scope
                ctl_addr = adm.stats().nodes[0].control_address
        # beta's certificate on the node's control channel: alpha's key is outside its scope
        beta = ControlClient(ctl_addr, tls=client_context(ca, tls / "tenants" / "beta.pem",
                                                          tls / "tenants" / "beta.key"))
        try:
            with pytest.raises(KVStoreError):
                beta.fetch([FetchRequest(b"@alpha/doc", 0, None)], 3)
        finally:
            beta.close()
        with Client(address, tls_ca=ca, tls_cert=str(ghost), tls_key=str(ghost_key), timeout=3, retries=0) as g, \
                pytest.raises(PermissionDenied, match="ghost"):
            g.put(b"x", b"y")
    finally:
        node.stop()
        master.stop()


def test_client_certificate_arguments_are_checked() -> None:
    with pytest.raises(InvalidArgument, match="go together"):
        Client("127.0.0.1:1", tls_ca="ca.pem", tls_cert="client.pem")
    with pytest.raises(InvalidArgument, match="needs tls_ca"):
        Client("127.0.0.1:1", tls_cert="client.pem", tls_key="client.key")


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_tcp_transport_over_tls(tmp_path: Path, mutual: bool) -> None:
    """The transfer engine's tcp:// with TLS: a verified peer reads and writes; a plaintext
    or wrongly-verified one gets nothing; with mutual TLS, nor does one without the client
    certificate."""
    import numpy as np

    from kvstore.tls import server_context
    from transport.base import TransportOptions
    from transport.regions import Desc
    from transport.registry import create

    files = make(tmp_path / "tls", [])
    server = create("tcp://127.0.0.1:0", TransportOptions(
        tls_server=server_context(files["cert"], files["key"], files["ca"] if mutual else None)))
    region = server.allocate(1 << 20, name="served")
    assert region.view is not None
    src = np.frombuffer(region.view, dtype=np.uint8)
    src[:] = np.arange(1 << 20, dtype=np.uint64).astype(np.uint8)
    mine = client_context(files["ca"], files["client_cert"], files["client_key"]) if mutual \
        else client_context(files["ca"])
    client = create("tcp://127.0.0.1:0", TransportOptions(listen=False, tls_client=mine))
    try:
        peer = client.connect(server.metadata(), timeout=10)
        local = client.allocate(1 << 20, name="local")
        client.read(peer, [Desc(local, 0, region.remote(), 0, 1 << 20)], timeout=10, checksum=True).wait()
        assert local.view is not None and bytes(local.view) == bytes(region.view)
        strangers = [TransportOptions(listen=False)]
        if mutual:
            strangers.append(TransportOptions(listen=False, tls_client=client_context(files["ca"])))
        for opts in strangers:
            plain = create("tcp://127.0.0.1:0", opts)
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
