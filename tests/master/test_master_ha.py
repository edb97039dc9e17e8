"""Several masters electing a leader through a real etcd: kill -9, pause and planned stops
of the leader, with real node and client processes following the leader (etcd:// addresses)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore.client import AsyncClient, Client
from kvstore.config import MasterConfig
from kvstore.errors import ConfigError, InvalidArgument, KVStoreError, TransportError
from kvstore.master.discovery import MasterAddress, find_leader, parse_endpoints, parse_etcd
from kvstore.master.server import serve_master
from kvstore.testing.cluster import Cluster
from kvstore.testing.etcd import EtcdServer
from kvstore.v1 import master_pb2 as pb
from kvstore.v1 import master_pb2_grpc as pb_grpc

FAILOVER_BUDGET = 5.0  # the goal for a client to resume after the leader dies


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as e:
        yield e


def value(key: bytes) -> bytes:
    return key * 64


def run_loop(c: Client, prefix: str, seconds: float, fault_at: float, fault: object) -> dict[str, object]:
    """put/get of fresh keys for ``seconds``; ``fault()`` once at ``fault_at``. Returns the
    acknowledged keys, wrong reads and the longest stretch without a successful op."""
    acked: list[bytes] = []
    wrong = 0
    start = last_ok = time.monotonic()
    longest_gap = 0.0
    faulted = False
    i = 0
    while time.monotonic() - start < seconds:
        if not faulted and time.monotonic() - start >= fault_at:
            fault()  # type: ignore[operator]
            faulted = True
        key = f"{prefix}-{i:05d}".encode()
        i += 1
        try:
            c.put(key, value(key), timeout=3)  # False: an earlier try of ours landed (checked below)
            acked.append(key)
            got = c.get(acked[len(acked) // 2], timeout=3)
            if got is not None and bytes(got) != value(acked[len(acked) // 2]):
                wrong += 1
        except KVStoreError:
            continue
        now = time.monotonic()
        longest_gap, last_ok = max(longest_gap, now - last_ok), now
    return {"acked": acked, "wrong": wrong, "gap": longest_gap, "ops": i}


def test_leader_killed_during_a_put_get_loop(tmp_path: Path, etcd: EtcdServer) -> None:
    """kill -9 the leader mid-loop: the client resumes within the failover budget, no read
    is ever wrong, and every acknowledged put is readable through the new leader (which
    rebuilt its table from the node's re-registration; it never saw those puts)."""
    with Cluster(tmp_path, node_ttl="3s", etcd=etcd.endpoint, cluster="kill", standbys=1).start(nodes=1) as cl:
        first = cl.leader()
        with Client(cl.master_address, timeout=10) as c:
            out = run_loop(c, "kill", 9.0, 2.0, lambda: cl.masters[first].signal(signal.SIGKILL))
        assert cl.leader() != first
        assert out["wrong"] == 0
        assert out["gap"] < FAILOVER_BUDGET, f"clients stalled {out['gap']:.1f}s\n{cl.logs()}"
        acked = out["acked"]
        assert isinstance(acked, list) and len(acked) > 20
        with Client(cl.master_address, timeout=10) as fresh:  # no cached locations: asks the new leader
            got = fresh.get_batch(acked)
        assert [bytes(g) if g is not None else None for g in got] == [value(k) for k in acked]


def test_paused_leader_steps_down_and_leads_again_later(tmp_path: Path, etcd: EtcdServer) -> None:
    """SIGSTOP the leader past its lease: the standby leads; the old one, resumed, refuses
    every call (it may not serve a table that is no longer the pool's) and campaigns as
    a standby; when the new leader is killed it leads again, with every key readable in
    its latest version (its own journal, from its earlier term, is not trusted)."""
    with Cluster(tmp_path, node_ttl="3s", etcd=etcd.endpoint, cluster="pause", standbys=1).start(nodes=1) as cl:
        keys = [b"pause-%03d" % i for i in range(40)]
        with Client(cl.master_address, timeout=10) as c:
            c.put_batch([(k, value(k)) for k in keys])
        old = cl.leader()
        cl.masters[old].signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while cl.leader() == old:
            assert time.monotonic() < deadline, "the standby did not take over"
            time.sleep(0.1)
        new = cl.leader()
        cl.masters[old].signal(signal.SIGCONT)
        with grpc.insecure_channel(f"127.0.0.1:{cl.master_ports[old]}") as ch:
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.MasterStub(ch).Stats(pb.StatsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not the leader" in (err.value.details() or "")
        with Client(cl.master_address, timeout=10) as c:
            assert all(c.exists_batch(keys))
            # a new version of some keys under the new leader: the old leader's journal still
            # lists the old versions, and must not make the node drop the new ones on failback
            assert all(c.remove_batch(keys[:5], force=True))
            assert all(c.put_batch([(k, value(k)[::-1]) for k in keys[:5]]))
        cl.masters[new].signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if cl.leader(timeout=1) == old:
                    break
            except TimeoutError:
                pass
            assert time.monotonic() < deadline, f"the old leader did not lead again\n{cl.logs()}"
            time.sleep(0.1)
        with Client(cl.master_address, timeout=15) as c:
            want = [value(k)[::-1] if i < 5 else value(k) for i, k in enumerate(keys)]
            assert [bytes(g) if g is not None else None for g in c.get_batch(keys)] == want
            assert c.put(b"after-failback", b"x")


def test_planned_stop_hands_over_at_once(tmp_path: Path, etcd: EtcdServer) -> None:
    """SIGTERM: the leader revokes its lease on the way out, so the standby leads well
    within one lease TTL, and an AsyncClient follows it."""
    with Cluster(tmp_path, node_ttl="3s", etcd=etcd.endpoint, cluster="stop", standbys=1,
                 leader_ttl="10s").start(nodes=1) as cl:
        first = cl.leader()

        async def put_get(key: bytes) -> bytes | None:
            async with AsyncClient(cl.master_address, timeout=10) as c:
                await c.put(key, value(key))
                got = await c.get(key)
                return None if got is None else bytes(got)

        assert asyncio.run(put_get(b"before")) == value(b"before")
        t = time.monotonic()
        cl.masters[first].stop()
        while True:
            try:
                if cl.leader(timeout=1) != first:
                    break
            except TimeoutError:
                pass
            assert time.monotonic() - t < 5, "no hand-over"
        assert time.monotonic() - t < 5  # a 10 s lease: only the revoke explains this
        assert asyncio.run(put_get(b"after")) == value(b"after")


def test_pins_survive_a_failover(tmp_path: Path, etcd: EtcdServer) -> None:
    """A pin is recorded in etcd before it is answered, and the next leader pins that
    version again as the node re-registers it; an unpinned key stays unpinned, and a
    pin of a key the pool lacks is a miss."""
    with Cluster(tmp_path, node_ttl="3s", etcd=etcd.endpoint, cluster="pins", standbys=1).start(nodes=1) as cl:
        first = cl.leader()
        with Client(cl.master_address, timeout=10) as c:
            for k in (b"p1", b"p2", b"p3"):
                c.put(k, value(k))
            assert c.pin_batch([b"p1", b"p2", b"nope"]) == [True, True, False]
            assert c.unpin_batch([b"p2"]) == [True]
            assert c.stats().pins == 1
            cl.masters[first].signal(signal.SIGKILL)
            deadline = time.monotonic() + 15
            while cl.leader() == first or c.stats().objects < 3:  # the node re-registers all three
                assert time.monotonic() < deadline, cl.logs()
                time.sleep(0.2)
            assert c.stats().pins == 1
            with pytest.raises(KVStoreError, match="pinned"):
                c.remove(b"p1")
            assert c.remove(b"p2") and c.remove(b"p3")
            assert c.unpin_batch([b"p1"]) == [True] and c.remove(b"p1")


def test_addresses_and_config_are_checked() -> None:
    t = parse_etcd("etcd://127.0.0.1:2379,10.0.0.2:2379/prod-a")
    assert t.endpoints == ("127.0.0.1:2379", "10.0.0.2:2379") and t.cluster == "prod-a"
    assert t.leader_key == b"/kvstore/prod-a/leader"
    assert parse_endpoints("http://127.0.0.1:2379, 127.0.0.2:2379/") == ("127.0.0.1:2379", "127.0.0.2:2379")
    for bad in ("etcd://127.0.0.1:2379", "etcd:///kv", "etcd://host/kv", "etcd://h:1/bad name", "h:1"):
        with pytest.raises(InvalidArgument):
            parse_etcd(bad)
    with pytest.raises(ConfigError, match="leader_ttl"):
        MasterConfig(leader_ttl=1.5)
    with pytest.raises(ConfigError, match="master.etcd"):
        MasterConfig(etcd="no-port")
    with pytest.raises(ConfigError, match="advertise"):
        serve_master(MasterConfig(host="0.0.0.0", port=0, etcd="127.0.0.1:1", insecure=True))
    assert MasterAddress("127.0.0.1:5555").current(1) == "127.0.0.1:5555"


def test_no_leader_is_a_clear_retryable_error(etcd: EtcdServer) -> None:
    target = parse_etcd(f"etcd://{etcd.endpoint}/nobody")
    with pytest.raises(TransportError, match="no master leads cluster 'nobody'"):
        find_leader(target, 2)
    with pytest.raises(TransportError, match="no etcd endpoint answered"):
        find_leader(parse_etcd("etcd://127.0.0.1:1/kv"), 1)
    with Client(target.url, timeout=1.5) as c, pytest.raises(KVStoreError) as err:
        c.stats()
    assert err.value.retryable


def test_a_standby_refuses_calls_until_it_leads(etcd: EtcdServer) -> None:
    """Two in-process masters on one cluster: the second is a standby (UNAVAILABLE, saying
    so) until the first stops; then it leads and answers."""
    cfg = MasterConfig(port=0, metrics_port=-1, etcd=etcd.endpoint, cluster="inproc", leader_ttl=2)
    with serve_master(cfg) as a:
        target = parse_etcd(f"etcd://{etcd.endpoint}/inproc")
        deadline = time.monotonic() + 10
        while True:
            try:
                assert find_leader(target, 1) == a.address
                break
            except TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with serve_master(cfg) as b:
            with grpc.insecure_channel(b.address) as ch:
                with pytest.raises(grpc.RpcError) as err:
                    pb_grpc.MasterStub(ch).Stats(pb.StatsRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "not the leader of cluster 'inproc'" in (err.value.details() or "")
            a.stop()
            with Client(target.url, timeout=10) as c:
                assert c.stats() is not None
            assert find_leader(target, 1) == b.address
