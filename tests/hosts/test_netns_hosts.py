"""Four "hosts" as Linux network namespaces on one bridge (kvstore.testing.netns): etcd and
two masters, two nodes and a client on different hosts talk over real interfaces only.
A put/get crosses hosts over the nodes' TCP control channels (no shared memory can cross a
namespace), the leader's host loses its master (kill -9) and a client on a third host still
reads everything through the standby on another host; a UCX transfer crosses two hosts."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.testing.netns import Hosts, available

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "from kvstore.cli import main; main()"]


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    why = available()
    if why is not None:
        pytest.skip(why)
    with Hosts(4) as h:
        yield h


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "UCX_TLS": "tcp", "UCX_WARN_UNUSED_ENV_VARS": "n"}


def wait_port(hosts: Hosts, i: int, port: int, timeout: float = 30) -> None:
    probe = f"import socket; socket.create_connection(('{hosts.ip(i)}', {port}), timeout=1).close()"
    deadline = time.monotonic() + timeout
    while hosts.run(i, [sys.executable, "-c", probe]).returncode != 0:
        assert time.monotonic() < deadline, f"{hosts.ip(i)}:{port} never opened"
        time.sleep(0.2)


def client(hosts: Hosts, i: int, master: str, token: Path, *args: str) -> dict[str, object]:
    r = hosts.run(i, [sys.executable, str(ROOT / "tests" / "hosts" / "netns_client.py"), master, str(token),
                      *args], env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, object] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def test_pool_across_hosts_with_failover(hosts: Hosts, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16))
    etcd_port, master_port, peer_port = 2379, 5555, 2380
    etcd_url = f"http://{hosts.ip(0)}:{etcd_port}"
    hosts.spawn(0, ["etcd", "--name", "kv", "--data-dir", str(tmp_path / "etcd"),
                    "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
                    "--listen-peer-urls", f"http://{hosts.ip(0)}:{peer_port}",
                    "--initial-advertise-peer-urls", f"http://{hosts.ip(0)}:{peer_port}",
                    "--initial-cluster", f"kv=http://{hosts.ip(0)}:{peer_port}"], tmp_path / "etcd.log")
    wait_port(hosts, 0, etcd_port)
    cluster = f"etcd://{hosts.ip(0)}:{etcd_port}/kv"
    masters = {}
    for i in (0, 1):  # host 0 leads first (it starts first), host 1 is the standby
        masters[i] = hosts.spawn(i, [*CLI, "master", "--host", hosts.ip(i), "--port", str(master_port),
                                     "--metrics-port", "-1", "--data-dir", str(tmp_path / f"master{i}"),
                                     "--node-ttl", "3s", "--token-file", str(token),
                                     "--etcd", f"{hosts.ip(0)}:{etcd_port}", "--cluster", "kv",
                                     "--leader-ttl", "2s"], tmp_path / f"master{i}.log", env=env())
        wait_port(hosts, i, master_port)
        time.sleep(0.5 if i == 0 else 0)
    for i in (1, 2):
        hosts.spawn(i, [*CLI, "node", "--master", cluster, "--host", hosts.ip(i), "--node-id", f"node{i}",
                        "--transport", "shm://", "--transport", "tcp://", "--dram", "64MiB",
                        "--metrics-port", "-1", "--token-file", str(token)], tmp_path / f"node{i}.log", env=env())
    logs = lambda: "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(tmp_path.glob("*.log")))  # noqa: E731
    assert client(hosts, 3, cluster, token, "nodes", "-", "2") == {"nodes": 2}, logs()

    out = client(hosts, 3, cluster, token, "put", "x", "20")
    assert out == {**out, "ok": 20, "wrong": 0, "missing": 0}, logs()
    counters = out["counters"]
    # nothing crossed a host through shared memory: no direct puts, no one-sided reads
    assert isinstance(counters, dict) and not counters.get("puts.direct") and not counters.get("hits.one_sided"), counters

    masters[0].kill()  # the leader's host loses its master
    masters[0].wait(10)
    t = time.monotonic()
    out = client(hosts, 3, cluster, token, "check", "x", "20")  # a fresh client: asks the new leader
    assert out == {**out, "ok": 20, "wrong": 0, "missing": 0}, logs()
    assert time.monotonic() - t < 15


def test_ucx_transfer_across_hosts(hosts: Hosts, tmp_path: Path) -> None:
    pytest.importorskip("ucxx", reason="needs ucxx (make install installs it)")
    n = 8 << 20
    peer = hosts.spawn(1, [sys.executable, str(ROOT / "tests" / "transport" / "peer.py"), "ucx://", str(n)],
                       tmp_path / "peer.log", env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert peer.stdout is not None
    line = ""
    while not line or (line.startswith("[") and "UCX" in line):
        line = peer.stdout.readline().decode()
        assert line, (tmp_path / "peer.log").read_text()
    meta, region = line.split()[:2]
    reader = ("import sys, numpy as np\n"
              "from kvstore.checksum import checksum\n"
              "from transport.registry import create\n"
              "from transport.regions import Desc, RemoteRegion\n"
              "t = create('ucx://')\n"
              f"peer = t.connect(bytes.fromhex('{meta}'), timeout=30)\n"
              f"r = t.allocate({n}, name='rx')\n"
              f"t.read(peer, [Desc(r, 0, RemoteRegion.from_bytes(bytes.fromhex('{region}')), 0, {n})], "
              "timeout=60, checksum=True).wait()\n"
              "print('sum', checksum(r.view))\n"
              "t.close()\n")
    r = hosts.run(2, [sys.executable, "-c", reader], env=env())
    got = [ln for ln in r.stdout.splitlines() if ln.startswith("sum ")]
    assert r.returncode == 0 and got, r.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "tests" / "transport"))
    from peer import pattern

    from kvstore.checksum import checksum

    assert int(got[0].split()[1]) == checksum(pattern(n))
    assert peer.stdin is not None
    peer.stdin.close()
    peer.wait(10)
