"""A secured pool (credentials from `kvstore auth init`, real master and node processes)
attacked by peers without credentials, with wrong ones, and as another uid: every
listener refuses them, and the legitimate client keeps reading the right bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.auth import init
from kvstore.checksum import checksum
from kvstore.client import Client
from kvstore.errors import KVStoreError, PermissionDenied
from kvstore.testing.cluster import CLI, Proc, free_port

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
pytestmark = pytest.mark.timeout(180)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class Secured:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.files = init(tmp / "auth")
        self.port = free_port()
        self.master = Proc("master", [*CLI, "master", "--port", str(self.port), "--metrics-port", "-1",
                                      "--auth-dir", str(tmp / "auth"), "--node-ttl", "3s"],
                           tmp / "master.log").start(env())
        self.node = Proc("node", [*CLI, "node", "--master", self.address, "--node-id", "n1", "--dram", "64MiB",
                                  "--transport", "shm://", "--transport", "tcp://", "--metrics-port", "-1",
                                  "--token-file", str(self.files["node"])], tmp / "node.log").start(env())
        deadline = time.monotonic() + 30
        last: Exception | None = None
        while True:
            try:
                with self.client("admin", timeout=2) as c:
                    if c.stats().nodes:
                        break
            except KVStoreError as e:  # still starting
                last = e
            assert time.monotonic() < deadline, f"{last}\n{self.logs()}"
            time.sleep(0.2)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def token(self, role: str) -> str:
        return self.files[role].read_text().strip()

    def client(self, role: str = "client:default", **kw: Any) -> Client:
        return Client(self.address, token=self.token(role), **kw)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in self.tmp.glob("*.log"))

    def stop(self) -> None:
        self.node.stop()
        self.master.stop()


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("secured")
    s = Secured(tmp)
    try:
        yield s
    finally:
        s.stop()


SECRET = {f"secret-{i}".encode(): os.urandom(200_000) for i in range(8)}


STORED = b"@default/"  # the tenant's key scope: the pool stores its keys under it


def attack(pool: Secured, parts: list[str], uid: int | None = None) -> dict[str, str]:
    with pool.client() as c:  # the default tenant's client
        c.put_batch(list(SECRET.items()))
        node = c.stats().nodes[0]
    eps = {e.scheme: e for e in node.endpoints}
    key = next(iter(SECRET))
    stored = STORED + key  # the worst case: the attacker knows the stored key and its checksum
    spec = {"parts": parts, "control": node.control_address, "master": pool.address, "node_id": node.node_id,
            "key": stored.hex(), "checksum": checksum(SECRET[key], stored),
            "tcp_meta": eps["tcp"].metadata.hex(), "tcp_region": eps["tcp"].region.hex(),
            "shm_meta": eps["shm"].metadata.hex(), "shm_region": eps["shm"].region.hex(),
            "client_token": pool.token("client:default")}
    if "master" in parts and uid is None:
        spec["node_token"] = pool.token("node")
    spec["uid"] = uid  # the attacker drops to it once its modules are loaded
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "security" / "attacker.py"), json.dumps(spec)],
                       env=env(), capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def still_served(pool: Secured) -> None:
    with pool.client(timeout=10) as c, pool.client(timeout=10, same_host=False) as tcp:
        for k, v in SECRET.items():
            assert bytes(c.get(k) or b"") == v
            assert bytes(tcp.get(k) or b"") == v


def test_peers_without_credentials_are_refused_everywhere(pool: Secured) -> None:
    got = attack(pool, ["control", "tcp", "master"])
    served = {k: v for k, v in got.items() if not v.startswith("refused")}
    assert not served, served
    assert len(got) == 6 + 2 + 5
    assert "PERMISSION_DENIED" in got["master_register_with_client_token"]
    assert "PERMISSION_DENIED" in got["master_lookup_with_node_token"]
    assert "UNAUTHENTICATED" in got["master_register_without_token"]
    still_served(pool)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the attacker as another uid")
def test_another_uid_is_refused_by_every_listener_including_shared_memory(pool: Secured) -> None:
    got = attack(pool, ["control", "tcp", "shm", "master"], uid=NOBODY)
    served = {k: v for k, v in got.items() if not v.startswith("refused")}
    assert not served, served
    # the node answers DENIED naming the uid and hangs up; the peer may see either first
    assert got["shm_map_arena"].startswith("refused"), got["shm_map_arena"]
    still_served(pool)


def test_a_bad_client_token_is_a_clear_error(pool: Secured) -> None:
    with Client(pool.address, token="not-a-token", timeout=3) as c, pytest.raises(PermissionDenied, match="bad token"):
        c.get(b"secret-0")
    with pool.client("node", timeout=3) as c, pytest.raises(PermissionDenied, match="not allowed for a node"):
        c.get(b"secret-0")


def test_tenants_with_identical_prompts_never_share_or_see_each_others_chunks(pool: Secured) -> None:
    from kvstore.auth import add_tenant
    from kvstore.keys import Namespace, chunk_keys
    from kvstore.layout import KVLayout

    other = add_tenant(pool.tmp / "auth", "tenant-x").read_text().strip()
    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float16", chunk_tokens=256)
    keys = chunk_keys(Namespace(model="m", layout=layout), list(range(4096)))  # one prompt, both tenants
    a_vals = {k: os.urandom(5000) for k in keys}
    with pool.client() as a:
        assert all(a.put_batch(list(a_vals.items())))
        deadline = time.monotonic() + 20
        while True:  # the new tenant's token reaches the node on a heartbeat
            try:
                with Client(pool.address, token=other, timeout=5) as b:
                    assert b.longest_prefix(keys) == 0  # a's chunks count for a only
                    assert b.get_batch(keys) == [None] * len(keys)
                    b_vals = {k: os.urandom(5000) for k in keys}
                    assert all(b.put_batch(list(b_vals.items())))  # new for b, not ALREADY_EXISTS
                    assert b.longest_prefix(keys) == len(keys)
                    assert [bytes(v or b"") for v in b.get_batch(keys)] == list(b_vals.values())
                    assert all(b.remove_batch(keys[:4], force=True))
                break
            except PermissionDenied:
                assert time.monotonic() < deadline
                time.sleep(0.3)
        assert a.longest_prefix(keys) == len(keys)  # b's removes did not touch a's chunks
        assert [bytes(v or b"") for v in a.get_batch(keys)] == list(a_vals.values())
    # a raw request naming the other tenant's stored key is refused by the master and the node
    import grpc

    from kvstore.node.control import ControlClient, FetchRequest
    from kvstore.v1 import master_pb2 as pb
    from kvstore.v1 import master_pb2_grpc as pb_grpc

    with grpc.insecure_channel(pool.address) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.MasterStub(ch).Lookup(pb.LookupRequest(keys=[STORED + keys[0]]),
                                      metadata=[("authorization", f"Bearer {other}")], timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "outside tenant" in err.value.details()
    with pool.client("admin") as adm:
        addr = adm.stats().nodes[0].control_address
    ctl = ControlClient(addr, token=other)
    try:
        with pytest.raises(KVStoreError, match="outside this credential's tenant"):
            ctl.fetch([FetchRequest(STORED + keys[0], 0, memoryview(bytearray(5000)))], 5)
    finally:
        ctl.close()


def test_handles_belong_to_the_session_that_got_them(pool: Secured) -> None:
    from kvstore.node.control import ControlClient
    from kvstore.node.protocol import Allocated, Op, SlotStatus

    with pool.client("admin") as c:
        addr = c.stats().nodes[0].control_address
    a = ControlClient(addr, token=pool.token("client:default"))
    b = ControlClient(addr, token=pool.token("client:default"))  # same tenant, another session
    try:
        got = Allocated(*a.call(Op.ALLOCATE, [[STORED + b"mine", 4096]], 5)[0])
        assert got.status == SlotStatus.OK and got.handle > 1 << 20  # random, not a counter
        assert b.call(Op.RELEASE, [got.handle], 5) == [SlotStatus.EXPIRED]
        assert b.call(Op.ABORT, [got.handle], 5) == [SlotStatus.EXPIRED]
        assert a.call(Op.RELEASE, [got.handle], 5) == [SlotStatus.OK]
    finally:
        a.close()
        b.close()


def test_writes_need_the_masters_grant(pool: Secured) -> None:
    """A client with a valid token cannot store on the node what the master did not place
    there (which would bypass quotas and the master's choice of keys): STORE and COMMIT
    without a grant, with a forged one, or with a grant for another key or size are
    refused, and nothing is stored; the client's own puts carry grants and work."""
    from kvstore.node.control import ControlClient, StoreRequest
    from kvstore.node.protocol import Allocated, Op, SlotStatus
    from kvstore.v1 import master_pb2 as mpb

    value = os.urandom(300_000)
    key = STORED + b"granted"
    with pool.client(timeout=10) as c:
        addr = c.stats().nodes[0].control_address
        fast = c._fast_channel(5)  # a real grant, as PutStart hands it to this client
        assert fast is not None
        placed = fast.call("PutStart", mpb.PutStartRequest(items=[mpb.PutItem(
            key=key, size=len(value), checksum=checksum(value, key))], replicas=1), 5).placements[0]
        assert placed.status == mpb.OK and len(placed.grants) == 1
        real = placed.grants[0]
        later = fast.call("PutStart", mpb.PutStartRequest(items=[mpb.PutItem(  # checksum with PutEnd
            key=key + b"-later", size=len(value), checksum_at_end=True)], replicas=1), 5).placements[0]
        assert later.status == mpb.OK and len(later.grants) == 1
    node = ControlClient(addr, token=pool.token("client:default"))
    try:
        other = STORED + b"not-granted"
        forged = real[:8] + bytes(16)
        attempts = {
            "none": StoreRequest(other, checksum(value, other), memoryview(value)),
            "forged": StoreRequest(other, checksum(value, other), memoryview(value), forged),
            "another key": StoreRequest(other, checksum(value, other), memoryview(value), real),
            "another size": StoreRequest(key, checksum(value[:-1], key), memoryview(value[:-1]), real),
        }
        attempts["at-end grant, another key"] = StoreRequest(other, None, memoryview(value), later.grants[0])
        attempts["at-end grant, another size"] = StoreRequest(key + b"-later", None, memoryview(value[:-1]),
                                                              later.grants[0])
        for name, req in attempts.items():
            assert node.store([req], 5)[0].status == SlotStatus.DENIED, name
        got = Allocated(*node.call(Op.ALLOCATE, [[other, len(value)]], 5)[0])
        assert got.status == SlotStatus.OK
        assert node.call(Op.COMMIT, [[got.handle, other, checksum(value, other)]], 5) == [SlotStatus.DENIED]
        # the connection stays usable, and the grant the master issued works
        assert node.store([StoreRequest(key, checksum(value, key), memoryview(value), real)],
                          5)[0].status == SlotStatus.OK
        # a grant for a put whose checksum comes at PutEnd takes the bytes with the checksum they have
        done = node.store([StoreRequest(key + b"-later", None, memoryview(value), later.grants[0])], 5)[0]
        assert done.status == SlotStatus.OK and done.checksum == checksum(value, key + b"-later")
    finally:
        node.close()
    with pool.client(timeout=10) as c:
        assert c.get(b"not-granted") is None  # nothing landed under the key the attempts named
        assert c.put(b"granted-by-put", value)  # same host: ALLOCATE + COMMIT with the grant
        assert bytes(c.get(b"granted-by-put") or b"") == value
    with pool.client(timeout=10, same_host=False) as tcp:
        assert tcp.put(b"granted-by-store", value)  # other host: STORE with the grant
        assert bytes(tcp.get(b"granted-by-store") or b"") == value


def test_added_tenant_is_accepted_by_master_and_node_while_running(pool: Secured) -> None:
    from kvstore.auth import add_tenant

    path = add_tenant(pool.tmp / "auth", "team-b")
    token = path.read_text().strip()
    deadline = time.monotonic() + 20
    while True:  # the master re-reads credentials.json; nodes get the new digest on a heartbeat
        try:
            with Client(pool.address, token=token, timeout=3, same_host=False) as c:
                c.put(b"team-b-key", b"hello" * 100)
                assert bytes(c.get(b"team-b-key") or b"") == b"hello" * 100
                break
        except PermissionDenied:
            assert time.monotonic() < deadline
            time.sleep(0.3)


def test_shared_segments_cannot_be_truncated_by_their_peers() -> None:
    from kvstore.errors import InvalidArgument
    from transport.shm.memory import map_fd, segment

    fd, m = segment(1 << 20, "sealed")
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)  # what a hostile peer holding the memfd would do
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 2 << 20)
    finally:
        m.close()
        os.close(fd)
    raw = os.memfd_create("unsealed")
    os.ftruncate(raw, 4096)
    with pytest.raises(InvalidArgument, match="not sealed"):
        map_fd(raw, 4096)


def test_protected_mode_for_nodes(tmp_path: Path) -> None:
    r = subprocess.run([*CLI, "node", "--master", "127.0.0.1:1", "--host", "0.0.0.0", "--dram", "8MiB",
                        "--metrics-port", "-1"], env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "refusing to serve 0.0.0.0 without authentication" in r.stderr
    token = tmp_path / "t"
    token.write_text("x" * 32)
    r = subprocess.run([*CLI, "node", "--master", "127.0.0.1:1", "--transport", "ucx://", "--dram", "8MiB",
                        "--metrics-port", "-1", "--token-file", str(token)], env=env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "ucx:// cannot check tokens" in r.stderr


def test_tenant_quota_stops_one_tenant_only(pool: Secured) -> None:
    from kvstore.auth import add_tenant
    from kvstore.errors import NoSpace

    small = add_tenant(pool.tmp / "auth", "small", quota_bytes=1 << 20).read_text().strip()
    deadline = time.monotonic() + 20
    while True:  # the master and the node pick the new tenant up
        try:
            with Client(pool.address, token=small, timeout=5) as c:
                c.exists(b"probe")
                ctl_ok = c.put(b"q-0", os.urandom(400_000))
            break
        except PermissionDenied:
            assert time.monotonic() < deadline
            time.sleep(0.3)
    assert ctl_ok
    with Client(pool.address, token=small, timeout=5) as c, pool.client() as other:
        assert c.put(b"q-1", os.urandom(400_000))  # 800 KB of 1 MiB
        with pytest.raises(NoSpace, match="quota"):
            c.put(b"q-2", os.urandom(400_000))
        assert other.put(b"not-limited", os.urandom(400_000))  # another tenant is not affected
        st = c.stats()  # a tenant's Stats counts its own objects only
        assert (st.objects, st.bytes, dict(st.counters)) == (2, 800_000, {})
        assert c.remove(b"q-0", force=True)
        assert c.put(b"q-2", os.urandom(400_000))  # room again


def test_tenant_pin_and_in_flight_limits(pool: Secured) -> None:
    """max_pins: a Pin past it is NoSpace (re-pinning a pinned key is free); max_puts_in_flight:
    a put that would pass it is TryAgain until reservations end; other tenants unaffected."""
    from kvstore.auth import add_tenant
    from kvstore.errors import InvalidArgument, NoSpace, TryAgain
    from kvstore.v1 import master_pb2 as mpb

    token = add_tenant(pool.tmp / "auth", "bounded", max_pins=2, max_puts_in_flight=2).read_text().strip()
    deadline = time.monotonic() + 20
    while True:  # the master and the node pick the new tenant up
        try:
            with Client(pool.address, token=token, timeout=5) as c:
                assert c.put_batch([(b"p-0", b"a" * 1000), (b"p-1", b"b" * 1000)]) == [True] * 2
                assert c.put(b"p-2", b"c" * 1000)
            break
        except PermissionDenied:
            assert time.monotonic() < deadline
            time.sleep(0.3)
    with Client(pool.address, token=token, timeout=3, retries=0) as c, pool.client() as other:
        with pytest.raises(InvalidArgument, match="split the batch"):  # a batch that can never fit
            c.put_batch([(f"big-{i}".encode(), b"x") for i in range(3)])
        assert c.pin_batch([b"p-0", b"p-1"]) == [True, True]
        assert c.pin_batch([b"p-1"]) == [True]  # already pinned: not a new pin
        with pytest.raises(NoSpace, match="max_pins"):
            c.pin_batch([b"p-2"])
        assert c.unpin_batch([b"p-0"]) == [True]
        assert c.pin_batch([b"p-2"]) == [True]
        # two reservations left open (PutStart without PutEnd), as a slow or dead writer leaves them
        scope = c._key_prefix
        assert scope
        start = mpb.PutStartRequest(items=[mpb.PutItem(key=scope + b"open-0", size=100, checksum=1),
                                           mpb.PutItem(key=scope + b"open-1", size=100, checksum=2)])
        held = c._grpc("PutStart", start, 5)
        with pytest.raises(TryAgain, match="max_puts_in_flight"):
            c.put(b"p-3", b"d" * 1000)
        assert other.put(b"in-flight-elsewhere", b"e" * 1000)  # another tenant is not limited
        c._grpc("PutRevoke", mpb.PutRevokeRequest(put_id=held.put_id, keys=[i.key for i in start.items]), 5)
        assert c.put(b"p-3", b"d" * 1000)
        assert bytes(c.get(b"p-3") or b"") == b"d" * 1000
