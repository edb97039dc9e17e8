"""A chaos harness: clients with their own record of acknowledged writes, a nemesis that
kills, pauses and corrupts real processes, and a checker that proves nothing is lost.

``run(seed, workdir, seconds=...)`` starts a :class:`~kvstore.testing.cluster.Cluster`
(one master with a journal, ``nodes`` store nodes), ``clients`` client processes
doing put / get / remove / longest_prefix on their own keys (``replicas=2``), and,
driven by ``seed``, a nemesis that every ``period`` seconds does one of these (each
kind once first, in an order drawn from the seed, then kinds at random):

* ``kill_node``: SIGKILL a node and start it again (its DRAM contents are gone);
* ``pause_node``: SIGSTOP a node past the node TTL, then SIGCONT;
* ``kill_master``: SIGKILL the master and start it again (it recovers its journal);
* ``pause_master``: SIGSTOP the master for 1.5x the node TTL, then SIGCONT;
* ``corrupt``: flip a byte of a value in a node's arena;
* ``fill_disk`` (with ``disk=True``: each node then has a disk tier on its own small
  tmpfs, and DRAM small enough to demote to it): fill that filesystem with a ballast
  file for 1.5x the node TTL, then delete it (the disk tier's index can no longer grow);
* ``partition`` (with ``hosts``, see :func:`run_on_hosts`): cut one host off the
  network for 1.5x the node TTL, then join it again. Its processes keep running: the
  master stops hearing its node (and, on the leader's host, the leader loses etcd and
  the other master takes over), clients see its endpoints time out, and after the heal
  its node re-registers what it still holds.

With ``etcd`` (an endpoint) two masters run as one cluster (leader + standby, a 2 s
lease) and everyone uses its ``etcd://`` address; the master faults then hit the
*leader*, and the harness measures each failover: the time from the fault until a
fresh client's call is answered (``failovers``), and the share of the clients'
operations started in that window that succeeded (``availability_during_failover``).

At most one fault is active at a time. Afterwards everything is healed and the
checker reads back every acknowledged write. It reports, per seed:

* ``wrong_reads``: a get returned bytes other than a value put under that key (must be 0);
* ``lost_acked_writes``: an acknowledged put (not removed later) that cannot be read
  back although a replica of it survived: it was placed on a node that was never
  killed or corrupted after the put (must be 0);
* ``destroyed``: acknowledged puts whose every replica was killed or corrupted (not a loss);
* operations and errors by kind, and crashes of processes the nemesis did not kill;
* ``leaks``: pins, read leases or node handles still held once every client finished.

No pickle crosses a socket: the client processes report through ``multiprocessing``
queues only to their parent, in plain tuples.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VALUE_SIZES = (4096, 65536, 300_000)
NEMESES = ("kill_node", "pause_node", "kill_master", "pause_master", "corrupt")
DISK_NEMESES = (*NEMESES, "fill_disk")  # with disk tiers on their own small filesystems (root)
HOST_NEMESES = (*NEMESES, "partition")  # with the processes spread over network namespaces (root)


def value_for(key: bytes, version: int) -> bytes:
    """The bytes version ``version`` of ``key`` holds (deterministic: a reader can check any get)."""
    size = VALUE_SIZES[int.from_bytes(hashlib.sha256(key).digest()[:2], "little") % len(VALUE_SIZES)]
    seed = hashlib.sha256(key + version.to_bytes(4, "little")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _client(idx: int, master: str, seconds: float, seed: int, out: Any, token: str | None = None) -> None:
    """One client process: random operations on its own keys; every outcome goes to ``out``."""
    import logging

    import grpc

    from kvstore.client import Client
    from kvstore.errors import KVStoreError
    from kvstore.v1 import master_pb2 as pb

    logging.getLogger("kvstore").setLevel(logging.ERROR)  # expected failures are counted, not logged

    def placed(key: bytes) -> list[str]:
        """The nodes the master lists for ``key`` right after its put was acknowledged."""
        try:
            loc = c._link.stub(3).Lookup(pb.LookupRequest(keys=[key]), timeout=3).locations[0]
        except (grpc.RpcError, KVStoreError):
            return []  # unknown placement: the checker counts a loss of it as a loss
        return [n.node_id for n in loc.nodes]

    rng = random.Random(seed * 1000 + idx)
    keys = [b"chaos-%d-%03d" % (idx, i) for i in range(40)]
    version: dict[bytes, int] = {}  # last version this client tried to put
    ops: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    wrong: list[str] = []
    # key -> [acked version, when, nodes, uncertain]: the last acknowledged put, and whether an
    # operation on the key failed since (it may or may not have taken effect)
    acked: dict[bytes, list[Any]] = {}
    timeline: list[tuple[float, bool]] = []  # (wall time an op started, whether it succeeded)
    deadline = time.monotonic() + seconds
    with Client(master, timeout=3.0, retries=2, replicas=2, token=token) as c:
        while time.monotonic() < deadline:
            key = rng.choice(keys)
            op = rng.choices(("put", "get", "remove", "prefix"), (4, 8, 1, 1))[0]
            ops[op] += 1
            timeline.append((time.time(), False))
            try:
                if op == "put":
                    v = version.get(key, 0) + 1
                    version[key] = v
                    if key in acked:  # keys are immutable: a new version replaces the old one
                        acked[key][3] = True
                        c.remove(key, force=True)
                        del acked[key]
                    c.put(key, value_for(key, v))
                    acked[key] = [v, time.time(), placed(key), False]
                elif op == "get":
                    got = c.get(key)
                    if got is not None and all(bytes(got) != value_for(key, v) for v in range(1, version.get(key, 0) + 1)):
                        wrong.append(f"{key!r}: {len(got)} bytes matching no version put")
                elif op == "remove":
                    if key in acked:
                        acked[key][3] = True
                    c.remove(key, force=True)
                    acked.pop(key, None)
                else:
                    c.longest_prefix(keys[:8])
                timeline[-1] = (timeline[-1][0], True)
            except KVStoreError as e:
                errors[type(e).__name__] += 1
                if op == "put" and key not in acked:  # a put that failed may still have landed
                    acked[key] = [version[key], time.time(), [], True]
    out.put(("done", idx, dict(ops), dict(errors), wrong,
             {k.hex(): [*a, version[k]] for k, a in acked.items()}, timeline))


@dataclass
class Report:
    seed: int
    ops: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    wrong_reads: int = 0
    lost_acked_writes: int = 0
    destroyed: int = 0
    checked: int = 0
    faults: list[tuple[float, str, str]] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    failovers: list[float] = field(default_factory=list)
    """Seconds from each fault of the leader until a fresh client was answered (etcd mode)."""
    failover_ops: int = 0
    failover_ok: int = 0
    leaks: list[str] = field(default_factory=list)
    """Pins, read leases or node handles still held once every client finished (must be empty)."""

    @property
    def availability_during_failover(self) -> float | None:
        return self.failover_ok / self.failover_ops if self.failover_ops else None

    def row(self) -> dict[str, Any]:
        return {"seed": self.seed, "ops": sum(self.ops.values()), "errors": sum(self.errors.values()),
                "errors_by_kind": dict(self.errors), "faults": len(self.faults),
                "fault_kinds": dict(Counter(f[1] for f in self.faults)), "wrong_reads": self.wrong_reads,
                "lost_acked_writes": self.lost_acked_writes, "destroyed": self.destroyed,
                "checked": self.checked, "crashes": self.crashes,
                "failovers_s": [round(f, 2) for f in self.failovers], "leaks": self.leaks,
                "availability_during_failover": self.availability_during_failover}


def _failover(cl: Any, since: float) -> float:
    """Seconds from ``since`` (wall time of a fault of the leader) until a fresh client's
    call is answered by the cluster's (new) leader."""
    from kvstore.client import Client

    with Client(cl.master_address, timeout=30, token=cl.token) as probe:
        probe.stats()
    return time.time() - since


def run(seed: int, workdir: Path, *, seconds: float = 40.0, clients: int = 3, nodes: int = 3,
        period: float = 4.0, node_ttl: float = 2.0, etcd: str | None = None, disk: bool = False,
        hosts: Any = None) -> Report:
    """One seed of the harness (see the module docstring). Processes are ended by PID.

    ``hosts`` (a :class:`~kvstore.testing.netns.Hosts` this process runs in host 0 of,
    with ``etcd`` reachable from all of them): a master and a node on each of hosts 1
    and 2, the third node here beside the clients (so they read it through shared
    memory and the others over TCP), everyone authenticated by a shared token; adds
    the ``partition`` nemesis (of host 1 or 2)."""
    from kvstore.client import Client
    from kvstore.errors import KVStoreError
    from kvstore.testing.cluster import Cluster

    rng = random.Random(seed)
    report = Report(seed)
    cl = Cluster(workdir, node_ttl=f"{node_ttl}s", dram="8MiB" if disk else "64MiB", etcd=etcd,
                 standbys=1 if etcd else 0, cluster=f"chaos{seed}", leader_ttl="2s", node_metrics=True,
                 disk="64MiB" if disk else None, disk_fs="96m" if disk else None, hold_ttl="4s")
    if hosts is not None:
        if etcd is None:
            raise ValueError("chaos on hosts needs etcd (two masters on different hosts)")
        cl.hosts, cl.master_hosts, cl.node_hosts = hosts, (1, 2), (1, 2, 0)
        cl.token = hashlib.sha256(b"chaos-%d" % seed).hexdigest()
    nemeses = DISK_NEMESES if disk else HOST_NEMESES if hosts is not None else NEMESES
    windows: list[tuple[float, float]] = []  # (fault, answered again) of each leader fault
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    procs = []
    try:
        cl.start(nodes=nodes)
        procs = [ctx.Process(target=_client, args=(i, cl.master_address, seconds, seed, out, cl.token),
                             daemon=True) for i in range(clients)]
        for p in procs:
            p.start()
        start = time.monotonic()
        killed_at: dict[str, list[float]] = {f"node{i}": [] for i in range(nodes)}
        first_round = rng.sample(nemeses, len(nemeses))  # every kind once (in a seeded order), then at random
        while time.monotonic() - start < seconds - period:
            time.sleep(period * rng.uniform(0.5, 1.0))
            kind = first_round.pop() if first_round else rng.choice(nemeses)
            i = rng.randrange(nodes)
            name = f"node{i}"
            host = 1 + rng.randrange(2) if kind == "partition" else 0  # the host a partition cuts off
            target = "master" if "master" in kind else f"host{host}" if kind == "partition" else name
            report.faults.append((round(time.monotonic() - start, 2), kind, target))
            if kind == "kill_node":
                cl.nodes[i].signal(signal.SIGKILL)
                killed_at[name].append(time.time())
                time.sleep(0.5)
                cl.start_node(i)
            elif kind == "pause_node":
                cl.nodes[i].signal(signal.SIGSTOP)
                time.sleep(1.5 * node_ttl)
                cl.nodes[i].signal(signal.SIGCONT)
            elif kind == "kill_master":
                li = cl.leader() if etcd else 0
                cl.master_procs()[li].signal(signal.SIGKILL)
                t0 = time.time()
                time.sleep(0.5)
                cl.start_master(li)  # with etcd it comes back as the standby
                if etcd:
                    report.failovers.append(_failover(cl, t0))
                    windows.append((t0, t0 + report.failovers[-1]))
            elif kind == "pause_master":
                li = cl.leader() if etcd else 0
                m = cl.master_procs()[li]
                m.signal(signal.SIGSTOP)
                t0 = time.time()
                if etcd:  # past its 2 s lease: the standby takes over while it sleeps
                    report.failovers.append(_failover(cl, t0))
                    windows.append((t0, t0 + report.failovers[-1]))
                time.sleep(max(1.5 * node_ttl - (time.time() - t0), 0))
                m.signal(signal.SIGCONT)
            elif kind == "partition":
                leads = cl.master_hosts[cl.leader()] == host
                hosts.partition(host)
                t0 = time.time()
                try:
                    if leads:  # its lease lapses in etcd: the master on the other host takes over
                        report.failovers.append(_failover(cl, t0))
                        windows.append((t0, t0 + report.failovers[-1]))
                    time.sleep(max(1.5 * node_ttl - (time.time() - t0), 0))
                finally:
                    hosts.heal(host)
            elif kind == "fill_disk":
                ballast = cl.workdir / name / "ballast"
                # a node that cannot demote to a full disk drops the chunk (an eviction, as when
                # the disk tier itself is full): its replicas may be gone, like after a kill
                killed_at[name].append(time.time() + 1.5 * node_ttl)
                _fill(ballast)
                time.sleep(1.5 * node_ttl)
                ballast.unlink(missing_ok=True)
            else:
                if _corrupt_one(cl.nodes[i].pid, rng):
                    killed_at[name].append(time.time())  # that replica may be gone (a miss, never wrong bytes)
        results: list[Any] = []
        give_up = time.monotonic() + seconds + 120
        while len(results) < len(procs) and time.monotonic() < give_up:
            try:
                results.append(out.get(timeout=1))
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
        for p in procs:
            p.join(30)
        done = {r[1] for r in results}
        report.crashes += [f"client{i}" for i in range(len(procs)) if i not in done]
        # Heal, then read back every acknowledged write.
        for h in range(1, hosts.n if hosts is not None else 1):
            hosts.heal(h)
        for i, node in enumerate(cl.nodes):
            node.signal(signal.SIGCONT)
            if not node.alive():
                report.crashes.append(f"node{i}")
                cl.start_node(i)
        for i, m in enumerate(cl.master_procs()):
            if not m.alive():
                report.crashes.append(f"master{i}")
                cl.start_master(i)
        cl.wait_nodes(nodes, timeout=60)
        time.sleep(node_ttl)
        _check_leaks(cl, nodes, report)
        with Client(cl.master_address, timeout=10, token=cl.token) as c:
            for _, idx, ops, errors, wrong, acked, timeline in results:
                for t, ok in timeline:
                    if any(lo <= t <= hi for lo, hi in windows):
                        report.failover_ops += 1
                        report.failover_ok += ok
                report.ops.update(ops)
                report.errors.update(errors)
                report.wrong_reads += len(wrong)
                report.details += [f"client {idx}: {w}" for w in wrong[:5]]
                for khex, (version, when, placed, uncertain, last) in acked.items():
                    key = bytes.fromhex(khex)
                    try:
                        got = c.get(key)
                    except KVStoreError as e:
                        got = None
                        report.details.append(f"{key!r}: {e}")
                    if got is not None:
                        report.checked += 1
                        if all(bytes(got) != value_for(key, v) for v in range(version, last + 1)):
                            report.wrong_reads += 1
                            report.details.append(f"{key!r}: read back bytes of no version in {version}..{last}")
                        continue
                    if uncertain:
                        continue  # its last operation failed: absent is one of the possible outcomes
                    report.checked += 1
                    survived = [n for n in placed if not any(t > when for t in killed_at.get(n, []))]
                    if placed and not survived:
                        report.destroyed += 1
                    else:
                        report.lost_acked_writes += 1
                        report.details.append(f"{key!r} v{version} on {placed} lost (faults: {report.faults})")
        return report
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        cl.stop()


def run_on_hosts(seed: int, workdir: Path, *, seconds: float = 40.0, timeout: float | None = None) -> Report:
    """:func:`run` with its processes on three network namespaces (root; see
    :mod:`kvstore.testing.netns`): host 0 runs etcd, this run's coordinator, its clients
    and one node; hosts 1 and 2 a master and a node each; the nemesis may also partition
    host 1 or 2. The coordinator is a child process inside host 0; its report comes back
    as JSON."""
    import json
    import subprocess
    import sys

    from kvstore.testing.netns import Hosts

    workdir.mkdir(parents=True, exist_ok=True)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root}
    with Hosts(3) as hosts:
        args = json.dumps({"seed": seed, "workdir": str(workdir), "seconds": seconds, "hosts": hosts.describe()})
        log = workdir / "coordinator.log"
        p = hosts.spawn(0, [sys.executable, "-m", "kvstore.testing.chaos", args], log, env=env,
                        stdout=subprocess.PIPE)
        try:
            out, _ = p.communicate(timeout=timeout if timeout is not None else seconds + 300)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)  # its clean-up ends the cluster it started, by PID
            out, _ = p.communicate(timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"chaos coordinator failed ({p.returncode}): {log.read_text()[-3000:]}")
    d = json.loads(out.decode().strip().splitlines()[-1])
    return Report(**{**d, "ops": Counter(d["ops"]), "errors": Counter(d["errors"]),
                     "faults": [tuple(f) for f in d["faults"]]})


def _coordinate(args: dict[str, Any]) -> None:
    """The coordinator of :func:`run_on_hosts`, inside host 0: etcd there, then :func:`run`."""
    import dataclasses
    import json

    from kvstore.testing.etcd import EtcdServer
    from kvstore.testing.netns import Hosts

    hosts = Hosts.attach(args["hosts"])
    workdir = Path(args["workdir"])
    with EtcdServer(workdir / "etcd", host=hosts.ip(0)) as etcd:
        report = run(int(args["seed"]), workdir / "cluster", seconds=float(args["seconds"]), etcd=etcd.endpoint,
                     hosts=hosts)
    # (dataclasses.asdict would turn each Counter into a Counter of its items)
    print(json.dumps({f.name: getattr(report, f.name) for f in dataclasses.fields(report)}), flush=True)


def _check_leaks(cl: Any, nodes: int, report: Report, within: float = 10.0) -> None:
    """Once every client finished: no pin, no read lease and no node handle may stay held
    (leases lapse after master.lease_ttl; handles are released by the clients, or reclaimed
    by the node after node.hold_ttl, 4 s here, when a release was lost to a fault)."""
    from kvstore.client import Client

    deadline = time.monotonic() + within
    while True:
        with Client(cl.master_address, timeout=10, token=cl.token) as c:
            s = c.stats()
        held = {f"node{i}": cl.node_gauge(i, "kvstore_node_holds") for i in range(nodes)}
        leaks = [f"{k}: {int(v)} handles" for k, v in held.items() if v] + \
            ([f"master: {s.pins} pins"] if s.pins else []) + ([f"master: {s.leases} leases"] if s.leases else [])
        if not leaks or time.monotonic() > deadline:
            report.leaks = leaks
            return
        time.sleep(0.5)


def _fill(path: Path) -> None:
    """Write ``path`` until its filesystem is full."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass


def _corrupt_one(pid: int, rng: random.Random) -> bool:
    """Flip one non-zero byte of the node's DRAM arena (its ``kvstore-arena`` memfd)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if not os.readlink(fd).startswith("/memfd:kvstore-arena"):
                continue
            with open(fd, "r+b") as f:
                data = f.read()
                used = [i for i in (rng.randrange(len(data)) for _ in range(2000)) if data[i]]
                if not used:
                    return False
                f.seek(used[0])
                f.write(bytes([data[used[0]] ^ 0xFF]))
                return True
        except OSError:
            continue
    return False


if __name__ == "__main__":  # the coordinator of run_on_hosts (python -m kvstore.testing.chaos JSON)
    import json
    import sys

    from kvstore.testing import chaos  # not __main__: the client processes import it by name

    chaos._coordinate(json.loads(sys.argv[1]))
