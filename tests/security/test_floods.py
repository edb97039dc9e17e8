"""A node under floods (real master and node processes, small caps from the node's
config file): idle and slow-drip connections, an acquire flood, decoder bombs. The node's
threads, memory and holds stay bounded and a legitimate client keeps getting its bytes."""

from __future__ import annotations

import os
import re
import resource
import socket
import struct
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest

from kvstore.client import Client
from kvstore.errors import KVStoreError
from kvstore.framing import HEADER
from kvstore.node.control import ControlClient
from kvstore.node.protocol import MAGIC, VERSION, Acquired, Op, SlotStatus, pack_frame
from kvstore.testing.cluster import CLI, Proc, free_port

ROOT = Path(__file__).resolve().parents[2]
CAP, IDLE, HOLDS = 32, 2.0, 256
VALUE = np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


class Node:
    def __init__(self, tmp: Path) -> None:
        (tmp / "node.toml").write_text(f"[node]\nmax_connections = {CAP}\nidle_timeout = \"{IDLE}s\"\n"
                                       f"max_holds = {HOLDS}\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.port, self.metrics = free_port(), free_port()
        self.master = Proc("master", [*CLI, "master", "--port", str(self.port), "--metrics-port", "-1"],
                           tmp / "master.log").start(env)
        self.node = Proc("node", [*CLI, "node", "--master", f"127.0.0.1:{self.port}", "--dram", "64MiB",
                                  "--metrics-port", str(self.metrics), "--config", str(tmp / "node.toml")],
                         tmp / "node.log").start(env)
        deadline = time.monotonic() + 30
        while True:
            try:
                with self.client() as c:
                    if c.stats().nodes:
                        self.control = c.stats().nodes[0].control_address
                        break
            except KVStoreError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with self.client() as c:
            c.put(b"legit", VALUE)

    def client(self, **kw: object) -> Client:
        return Client(f"127.0.0.1:{self.port}", same_host=False, **kw)  # type: ignore[arg-type]

    def status(self, field: str, pid: int | None = None) -> int:
        """A field of /proc/PID/status (the node's by default)."""
        text = Path(f"/proc/{pid or self.node.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]

    def holds(self) -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).read().decode()
        return float(re.search(r"^kvstore_node_holds\{[^}]*\} (\S+)", body, re.M).group(1))  # type: ignore[union-attr]

    def drop(self, socks: list[socket.socket], threads: int) -> None:
        """Close ``socks``; their connection threads must go away (back to ``threads``)."""
        for s in socks:
            s.close()
        deadline = time.monotonic() + 10
        while self.status("Threads") > threads + 2:
            assert time.monotonic() < deadline, "connection threads did not go away"
            time.sleep(0.2)

    def legit_get(self) -> None:
        with self.client(timeout=15) as c:
            assert bytes(c.get(b"legit") or b"") == VALUE

    def stop(self) -> None:
        self.node.stop()
        self.master.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("flood"))
    try:
        yield n
    finally:
        n.stop()


def _connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=5)


def test_2000_idle_connections(node: Node) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    threads, rss = node.status("Threads"), node.status("VmRSS")
    socks = []
    try:
        for _ in range(2000):
            try:
                socks.append(_connect(node.control))
            except OSError:
                continue
        time.sleep(0.5)
        assert node.status("Threads") <= threads + CAP + 4  # one thread per admitted connection
        assert node.status("VmRSS") - rss < 64 << 10  # kB
        node.legit_get()  # the idle ones are dropped after IDLE seconds; the client retries meanwhile
    finally:
        node.drop(socks, threads)


def test_transport_endpoints_under_idle_floods(node: Node) -> None:
    """2,000 idle connections to the node's tcp:// and shm:// endpoints (the transfer engine):
    threads and memory stay bounded by node.max_connections, and a real peer still gets
    served (the connection idle longest makes room for it)."""
    from transport.base import TransportOptions
    from transport.regions import Desc, RemoteRegion
    from transport.registry import create

    with node.client() as c:
        eps = {e.scheme: e for e in c.stats().nodes[0].endpoints}
    tcp_meta, shm_meta = bytes(eps["tcp"].metadata), bytes(eps["shm"].metadata)
    port = struct.unpack_from("<4sH", tcp_meta)[1]
    tcp_addr = (tcp_meta[struct.calcsize("<4sH"):].decode(), port)
    shm_name = shm_meta[struct.calcsize("<4sI"):]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 8192), hard), hard))
    threads, rss = node.status("Threads"), node.status("VmRSS")
    socks: list[socket.socket] = []
    try:
        for _ in range(2000):
            try:
                socks.append(socket.create_connection(tcp_addr, timeout=5))
                u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                socks.append(u)
                u.connect(shm_name)
            except OSError:
                continue
        time.sleep(0.5)
        assert node.status("Threads") <= threads + 2 * CAP + 4  # a thread per admitted connection, per endpoint
        assert node.status("VmRSS") - rss < 64 << 10  # kB
        for scheme, meta, region in (("tcp://127.0.0.1:0", tcp_meta, eps["tcp"].region),
                                     ("shm://", shm_meta, eps["shm"].region)):
            t = create(scheme, TransportOptions(listen=scheme.startswith("tcp")))
            try:
                peer = t.connect(meta, timeout=10)
                local = t.allocate(4096, name="probe")
                t.read(peer, [Desc(local, 0, RemoteRegion.from_bytes(bytes(region)), 0, 4096)], timeout=10).wait()
            finally:
                t.close()
        node.legit_get()
    finally:
        node.drop(socks, threads)


def test_slow_drip_frames_do_not_keep_their_slots(node: Node) -> None:
    frame = pack_frame(Op.ACQUIRE, msgpack.packb([b"legit"]))
    socks = [_connect(node.control) for _ in range(CAP)]
    try:
        t = time.monotonic()
        alive = list(socks)
        for i in range(len(frame)):  # one byte every IDLE/3 s: each recv in time, the frame never
            for s in list(alive):
                try:
                    s.sendall(frame[i:i + 1])
                except OSError:
                    alive.remove(s)
            if not alive or time.monotonic() - t > 3 * IDLE:
                break
            time.sleep(IDLE / 3)
        assert time.monotonic() - t < 3 * IDLE + 2
        node.legit_get()
    finally:
        for s in socks:
            s.close()


def test_acquire_flood_is_capped_per_session(node: Node) -> None:
    c = ControlClient(node.control)
    try:
        got, took = [], []
        for _ in range(10):
            t = time.monotonic()
            got += [Acquired(*r).status for r in c.call(Op.ACQUIRE, [b"legit"] * 100, 5)]
            took.append(time.monotonic() - t)
        assert got.count(SlotStatus.OK) == HOLDS and got.count(SlotStatus.BUSY) == 1000 - HOLDS
        # every answer with a BUSY in it waited node.busy_backoff (10 ms by default): a session
        # flooding holds gets at most ~100 answers a second
        assert all(dt >= 0.01 for dt in took[HOLDS // 100:]), took
        assert node.holds() <= HOLDS
        node.legit_get()  # another session is not affected
    finally:
        c.close()  # the holds go at the node's hold TTL; nothing else leaks


@pytest.mark.parametrize("payload", [
    b"\xdd\xff\xff\xff\xff",  # msgpack array32 claiming 4 G items, with none sent
    b"\xc6\x7f\xff\xff\xff",  # bin32 of 2 GiB
    b"\x91" * 100_000 + b"\xc0",  # 100,000 nested one-item arrays
    msgpack.packb([[b"k" * 70_000]]),  # a key far over the limit
], ids=["array32", "bin32", "nested", "long-key"])
def test_decoder_bombs_are_refused(node: Node, payload: bytes) -> None:
    rss = node.status("VmRSS")
    with _connect(node.control) as s:
        s.sendall(HEADER.pack(MAGIC, VERSION, Op.ACQUIRE, 0, len(payload)) + payload)
        s.settimeout(5)
        data = s.recv(1 << 16)
    assert data[:4] == MAGIC and data[6] & 1  # an error reply, then the node hangs up
    assert node.status("VmRSS") - rss < 64 << 10
    node.legit_get()


def test_foreign_frames_are_refused(node: Node) -> None:
    for raw in (b"GET / HTTP/1.1\r\n\r\n", struct.pack("<4sBBHI", MAGIC, VERSION, 200, 0, 1 << 30)):
        with _connect(node.control) as s:
            s.sendall(raw)
            s.settimeout(5)
            assert s.recv(1 << 16)[:4] in (MAGIC, b"")
    node.legit_get()


def test_master_under_idle_connections_and_a_call_flood(node: Node) -> None:
    """The master's gRPC port and framed channel, 1,000 idle connections each, then a
    flood of concurrent Lookups: its threads and memory stay bounded and a legitimate
    client keeps reading its bytes."""
    from concurrent.futures import ThreadPoolExecutor

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))

    def status(field: str) -> int:
        return node.status(field, node.master.pid)

    with node.client() as c:
        c.stats()
        c.exists(b"legit")  # a keyed call: the client opens the framed channel
        assert c._fast is not None
        fast = c._fast.address
    threads, rss = status("Threads"), status("VmRSS")
    socks = []
    try:
        for address in (f"127.0.0.1:{node.port}", fast):
            for _ in range(1000):
                try:
                    socks.append(_connect(address))
                except OSError:
                    continue
        time.sleep(0.5)
        node.legit_get()

        def hammer(i: int) -> int:
            with node.client(timeout=5, retries=0) as c:
                n = 0
                for j in range(50):
                    try:
                        c.exists_batch([f"flood-{i}-{j}-{k}".encode() for k in range(64)])
                        n += 1
                    except KVStoreError:
                        pass  # refused under load (RESOURCE_EXHAUSTED) is fine; wrong answers are not
                return n

        with ThreadPoolExecutor(16) as pool:
            done = sum(pool.map(hammer, range(32)))
        assert done > 0
        node.legit_get()
        assert status("Threads") <= threads + 16  # no thread per connection or per call
        assert status("VmRSS") - rss < 64 << 10  # kB, for 2,000 connections and 1,600 calls (~15 MB measured)
    finally:
        for s in socks:
            s.close()
