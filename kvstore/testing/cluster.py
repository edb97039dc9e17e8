"""A real local cluster for tests and benchmarks: master and nodes as subprocesses.

Every process is started through the ``kvstore`` CLI exactly as a user would,
bound to 127.0.0.1, and ended by PID. ``kill``/``pause``/``resume`` deliver real
signals (SIGKILL, SIGSTOP, SIGCONT).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.errors import KVStoreError

CLI = [sys.executable, "-c", "from kvstore.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> Proc:
        with open(self.log, "ab") as out:  # the child keeps its own copy of the descriptor
            self.popen = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT,
                                          env=env, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.popen is not None
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(5)


@dataclass
class Cluster:
    """``Cluster(tmp_path).start(nodes=3)``; ``cluster.master_address`` for clients."""

    workdir: Path
    node_ttl: str = "3s"
    dram: str = "64MiB"
    disk: str | None = None
    transports: tuple[str, ...] = ("shm://", "tcp://")
    master_port: int = field(default_factory=free_port)
    master: Proc | None = None
    nodes: list[Proc] = field(default_factory=list)
    etcd: str | None = None
    """An etcd endpoint: run ``1 + standbys`` masters electing a leader (etcd:// address)."""
    standbys: int = 0
    cluster: str = "kv"
    leader_ttl: str = "2s"
    masters: list[Proc] = field(default_factory=list)
    master_ports: list[int] = field(default_factory=list)
    disk_fs: str | None = None
    """Mount each node's disk directory as a tmpfs of this size (``"48m"``; root), so a
    test can fill the filesystem under a disk tier."""
    mounts: list[Path] = field(default_factory=list)
    hold_ttl: str | None = None
    """Nodes reclaim handles a client keeps longer than this (``node.hold_ttl``; default 60s)."""
    node_metrics: bool = False
    """Serve each node's Prometheus /metrics (``metrics_ports[i]``) for checks like held handles."""
    metrics_ports: dict[int, int] = field(default_factory=dict)
    hosts: Any = None
    """A :class:`~kvstore.testing.netns.Hosts` (with ``etcd``, reachable from them): master
    ``i`` then runs inside host ``master_hosts[i]`` and node ``i`` inside ``node_hosts[i]``
    (modulo their lengths), each bound to its host's address, so they talk over real
    interfaces and a host can be partitioned. The caller runs inside one of the hosts."""
    master_hosts: tuple[int, ...] = (0,)
    node_hosts: tuple[int, ...] = (0,)
    token: str | None = None
    """A shared token for the master and nodes (``--token-file``; clients pass it as
    ``token=``): required for nodes bound to a non-loopback address."""

    def _token_args(self) -> list[str]:
        if self.token is None:
            return []
        path = self.workdir / "token"
        if not path.exists():
            self.workdir.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(self.token)
        return ["--token-file", str(path)]

    @property
    def master_address(self) -> str:
        if self.etcd is not None:
            return f"etcd://{self.etcd}/{self.cluster}"
        return f"127.0.0.1:{self.master_port}"

    def env(self) -> dict[str, str]:
        root = str(Path(__file__).resolve().parents[2])
        return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}

    def _where(self, placed: tuple[int, ...], i: int) -> tuple[list[str], str]:
        """Command prefix and bind address of the ``i``-th process placed by ``placed``."""
        if self.hosts is None:
            return [], "127.0.0.1"
        h = placed[i % len(placed)]
        return self.hosts.prefix(h), self.hosts.ip(h)

    def master_addr(self, i: int) -> str:
        return f"{self._where(self.master_hosts, i)[1]}:{self.master_ports[i]}"

    def start_master(self, i: int = 0) -> Proc:
        """Start master ``i`` (0 unless several masters run through etcd)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if i == 0 and not self.master_ports:
            self.master_ports.append(self.master_port)
        while len(self.master_ports) <= i:
            self.master_ports.append(free_port())
        port = self.master_ports[i]
        name = "master" if i == 0 else f"master{i}"
        prefix, host = self._where(self.master_hosts, i)
        args = [*prefix, *CLI, "master", "--host", host, "--port", str(port), "--metrics-port", "-1",
                "--data-dir", str(self.workdir / name), "--node-ttl", self.node_ttl]
        if self.etcd is not None:
            args += ["--etcd", self.etcd, "--cluster", self.cluster, "--leader-ttl", self.leader_ttl]
        args += self._token_args()
        proc = Proc(name, args, self.workdir / f"{name}.log").start(self.env())
        if i < len(self.masters):
            self.masters[i] = proc
        else:
            self.masters.append(proc)
        if i == 0:
            self.master = proc
        self.wait_master(i)
        return proc

    def wait_master(self, i: int = 0, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        proc, port = (self.masters[i], self.master_ports[i]) if self.masters else (self.master, self.master_port)
        host = self._where(self.master_hosts, i)[1]
        while time.monotonic() < deadline:
            assert proc is not None
            if not proc.alive():
                raise RuntimeError(f"master exited: {proc.log.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex((host, port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError("master did not start")

    def leader(self, timeout: float = 20.0) -> int:
        """Index of the master that leads now (through etcd), waiting for one to."""
        from kvstore.master.discovery import find_leader, parse_etcd

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                address = find_leader(parse_etcd(self.master_address), 2.0)
                return [self.master_addr(k) for k in range(len(self.master_ports))].index(address)
            except (KVStoreError, ValueError) as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"no master led within {timeout}s ({last})")

    def start_node(self, i: int | None = None) -> Proc:
        i = len(self.nodes) if i is None else i
        if self.node_metrics:
            self.metrics_ports[i] = free_port()
        prefix, host = self._where(self.node_hosts, i)
        args = [*prefix, *CLI, "node", "--master", self.master_address, "--host", host, "--node-id", f"node{i}",
                "--dram", self.dram, "--metrics-port", str(self.metrics_ports.get(i, -1))]
        for t in self.transports:
            args += ["--transport", t]
        args += self._token_args()
        if self.hold_ttl is not None:
            conf = self.workdir / "node.toml"
            conf.write_text(f'[node]\nhold_ttl = "{self.hold_ttl}"\n')
            args += ["--config", str(conf)]
        if self.disk:
            disk_dir = self.workdir / f"node{i}"
            if self.disk_fs and disk_dir not in self.mounts:
                disk_dir.mkdir(parents=True, exist_ok=True)
                subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.disk_fs}", "tmpfs", str(disk_dir)],
                               check=True, capture_output=True)
                self.mounts.append(disk_dir)
            args += ["--disk-dir", str(disk_dir), "--disk", self.disk]
        p = Proc(f"node{i}", args, self.workdir / f"node{i}.log").start(self.env())
        if i < len(self.nodes):
            self.nodes[i] = p
        else:
            self.nodes.append(p)
        return p

    def start(self, nodes: int = 1) -> Cluster:
        self.start_master()
        if self.etcd is not None:
            self.leader()  # the first master leads before the standbys start
            for i in range(1, 1 + self.standbys):
                self.start_master(i)
        for _ in range(nodes):
            self.start_node()
        self.wait_nodes(nodes)
        return self

    def live_nodes(self) -> list[str]:
        from kvstore.client import Client

        with Client(self.master_address, timeout=5, token=self.token) as c:
            return [n.node_id for n in c.stats().nodes]

    def wait_nodes(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: KVStoreError | None = None
        while time.monotonic() < deadline:
            for p in self.nodes:
                if p.popen is not None and p.popen.poll() is not None:
                    raise RuntimeError(f"{p.name} exited: {p.log.read_text()[-2000:]}")
            try:
                if len(self.live_nodes()) >= n:
                    return
            except KVStoreError as e:  # the master may still be starting: retried until timeout
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"{n} nodes did not register in {timeout}s (last error: {last})")

    def node_gauge(self, i: int, name: str) -> float:
        """Sum of a node's Prometheus gauge ``name`` (needs ``node_metrics``)."""
        import re
        import urllib.request

        host = self._where(self.node_hosts, i)[1]
        body = urllib.request.urlopen(f"http://{host}:{self.metrics_ports[i]}/metrics", timeout=5).read()
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", body.decode(), re.M))

    def logs(self) -> str:
        out = []
        for p in [*self.master_procs(), *self.nodes]:
            if p is not None and p.log.exists():
                out.append(f"--- {p.name} ---\n{p.log.read_text()[-3000:]}")
        return "\n".join(out)

    def master_procs(self) -> list[Proc]:
        return self.masters or ([self.master] if self.master is not None else [])

    def stop(self) -> None:
        for p in self.nodes:
            p.stop()
        for m in self.master_procs():
            m.stop()
        for d in self.mounts:
            subprocess.run(["umount", "-l", str(d)], capture_output=True)
        self.mounts = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
