"""A real ``kvstore master`` process killed with SIGKILL and restarted on its data dir.

The test plays the nodes itself (RegisterNode/Heartbeat over gRPC).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvstore.v1 import master_pb2 as pb
from kvstore.v1 import master_pb2_grpc as pb_grpc

OK = pb.ItemStatus.Value("OK")
CMD = [sys.executable, "-c", "from kvstore.cli import main; main()"]


class Proc:
    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.p = subprocess.Popen(
            [*CMD, "master", "--port", "0", "--metrics-port", "-1", "--data-dir", str(data_dir),
             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        m = re.search(r"listening on (\S+?),", line)
        if m is None:
            self.p.kill()
            raise AssertionError(f"no address in {line!r}: {self.p.stderr.read() if self.p.stderr else ''}")
        self.address = m.group(1)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.MasterStub(self.channel)

    def kill9(self) -> None:
        self.channel.close()
        os.kill(self.p.pid, signal.SIGKILL)
        self.p.wait(timeout=10)

    def stop(self) -> str:
        self.channel.close()
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        out, err = self.p.communicate(timeout=20)
        assert self.p.returncode == 0, err
        return out


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        if p.p.poll() is None:
            p.p.kill()
            p.p.wait(timeout=10)


def key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def register(stub: pb_grpc.MasterStub, nid: str, held: list[bytes] = ()) -> int:  # type: ignore[assignment]
    r = stub.RegisterNode(pb.RegisterNodeRequest(
        node_id=nid, host="h", control_address="127.0.0.1:1",
        tiers=[pb.TierCapacity(name="dram", capacity=1 << 30)],
        held=[pb.HeldKey(key=k, size=100, checksum=5) for k in held]))
    return int(r.epoch)


def put_on(stub: pb_grpc.MasterStub, keys: list[bytes], end: bool = True) -> None:
    r = stub.PutStart(pb.PutStartRequest(items=[pb.PutItem(key=k, size=100, checksum=5)
                                                for k in keys]))
    assert all(p.status == OK for p in r.placements)
    if end:
        assert list(stub.PutEnd(pb.PutEndRequest(put_id=r.put_id, keys=keys)).statuses) == \
            [OK] * len(keys)


def prefix(stub: pb_grpc.MasterStub, keys: list[bytes]) -> int:
    return int(stub.LongestPrefix(pb.LongestPrefixRequest(keys=keys)).count)


def test_kill9_restart_recovers_committed_keys(tmp_path: Path, procs: list[Proc]) -> None:
    data = tmp_path / "master"
    m = Proc(data, "--node-ttl", "1.5s")
    procs.append(m)
    e1 = register(m.stub, "n1")
    committed = [key(i) for i in range(20)]
    put_on(m.stub, committed)
    put_on(m.stub, [key(100)], end=False)  # pending: not persisted
    m.kill9()

    m2 = Proc(data, "--node-ttl", "1.5s")
    procs.append(m2)
    assert prefix(m2.stub, committed) == 20
    # the node keeps heartbeating with its epoch through the restart
    hb = m2.stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", epoch=e1))
    assert not hb.reregister
    assert prefix(m2.stub, [key(100)]) == 0
    put_on(m2.stub, [key(100)])  # the abandoned reservation is gone
    # re-registration keeps what matches and adopts what the master does not know (the node
    # verified those bytes when it stored them); another version of a known key is dropped
    e2 = register(m2.stub, "n1", held=[*committed, key(100), key(555)])
    assert e2 > e1
    assert prefix(m2.stub, [key(555)]) == 1
    r = m2.stub.RegisterNode(pb.RegisterNodeRequest(
        node_id="n1", host="h", tiers=[pb.TierCapacity(name="dram", capacity=1 << 30)],
        held=[pb.HeldKey(key=k, size=100, checksum=5) for k in [*committed, key(555)]]
        + [pb.HeldKey(key=key(100), size=100, checksum=6)]))
    assert list(r.drop) == [key(100)]
    assert prefix(m2.stub, committed) == 20
    m2.kill9()

    m3 = Proc(data, "--node-ttl", "1.5s")
    procs.append(m3)
    assert prefix(m3.stub, committed) == 20
    # nobody heartbeats now: within one TTL of the restart the node and its keys are gone
    deadline = time.monotonic() + 10
    while prefix(m3.stub, committed) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert prefix(m3.stub, committed) == 0
    assert m3.stub.Heartbeat(pb.HeartbeatRequest(node_id="n1", epoch=r.epoch)).reregister
    assert "stopped" in m3.stop()


def test_cli_help_and_bad_option(tmp_path: Path) -> None:
    out = subprocess.run([*CMD, "master", "--help"], capture_output=True, text=True, timeout=60)
    for opt in ("--host", "--port", "--metrics-port", "--data-dir", "--node-ttl", "--config",
                "--token-file"):
        assert opt in out.stdout
    bad = subprocess.run([*CMD, "master", "--node-ttl", "soon"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2
    assert "master.node_ttl" in bad.stderr and "Traceback" not in bad.stderr
