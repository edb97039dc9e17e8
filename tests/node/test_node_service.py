"""The node's control service against bad and hostile requests (real gRPC, in-process node)."""

import grpc
import numpy as np
import pytest

from kvstore.checksum import checksum
from kvstore.config import NodeConfig, StoreConfig
from kvstore.node.daemon import StoreNode
from kvstore.testing.cluster import free_port
from kvstore.v1 import node_pb2 as npb
from kvstore.v1 import node_pb2_grpc


@pytest.fixture
def node():
    # No master: the node serves regardless and keeps trying to register.
    n = StoreNode(NodeConfig(master=f"127.0.0.1:{free_port()}", transports=("tcp://",), metrics_port=-1,
                             hold_ttl=1.0),
                  StoreConfig(dram="8MiB", prefault=False)).start(register_timeout=0.1)
    yield n
    n.stop()


@pytest.fixture
def stub(node):
    ch = grpc.insecure_channel(node.control_address)
    yield node_pb2_grpc.NodeStub(ch)
    ch.close()


def test_allocate_commit_acquire_release(node, stub):
    data = np.arange(1000, dtype=np.uint8).tobytes()
    slot = stub.Allocate(npb.AllocateRequest(items=[npb.AllocItem(key=b"k", size=len(data))])).slots[0]
    assert slot.status == npb.SLOT_OK
    node.store.arena.buffer[slot.offset:slot.offset + len(data)] = np.frombuffer(data, np.uint8)
    st = stub.Commit(npb.CommitRequest(items=[npb.CommitItem(handle=slot.handle, key=b"k",
                                                             checksum=checksum(data, b"k"))]))
    assert list(st.statuses) == [npb.SLOT_OK]
    got = stub.Acquire(npb.AcquireRequest(keys=[b"k", b"missing"])).slots
    assert got[0].status == npb.SLOT_OK and got[0].checksum == checksum(data, b"k")
    assert got[1].status == npb.SLOT_NOT_FOUND
    assert list(stub.Release(npb.HandlesRequest(handles=[got[0].handle, 999])).statuses) == \
        [npb.SLOT_OK, npb.SLOT_EXPIRED]


def test_bad_items_and_checksums(node, stub):
    slots = stub.Allocate(npb.AllocateRequest(items=[
        npb.AllocItem(key=b"", size=10), npb.AllocItem(key=b"x" * 300, size=10),
        npb.AllocItem(key=b"z", size=0), npb.AllocItem(key=b"big", size=1 << 40)])).slots
    assert [s.status for s in slots] == [npb.SLOT_INVALID] * 4
    ok = stub.Allocate(npb.AllocateRequest(items=[npb.AllocItem(key=b"k", size=100)])).slots[0]
    # Wrong checksum: refused, nothing stored, space returned.
    st = stub.Commit(npb.CommitRequest(items=[npb.CommitItem(handle=ok.handle, key=b"k", checksum=1)]))
    assert list(st.statuses) == [npb.SLOT_CORRUPT]
    assert not node.store.exists(b"k")
    # Committing a handle under another key, or twice, is refused.
    ok = stub.Allocate(npb.AllocateRequest(items=[npb.AllocItem(key=b"k", size=100)])).slots[0]
    st = stub.Commit(npb.CommitRequest(items=[npb.CommitItem(handle=ok.handle, key=b"other", checksum=1)]))
    assert list(st.statuses) == [npb.SLOT_EXPIRED]
    st = stub.Commit(npb.CommitRequest(items=[npb.CommitItem(handle=ok.handle, key=b"k", checksum=1)]))
    assert list(st.statuses) == [npb.SLOT_EXPIRED]
    assert node.store.arena.used == 0


def test_oversize_batch_and_garbage_are_rejected_and_node_keeps_serving(node, stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Acquire(npb.AcquireRequest(keys=[b"k"] * 70000))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ch = grpc.insecure_channel(node.control_address)
    raw = ch.unary_unary("/kvstore.v1.Node/Allocate")
    with pytest.raises(grpc.RpcError):
        raw(b"\xff\xff\xff\xff garbage", timeout=5)
    ch.close()
    assert stub.Acquire(npb.AcquireRequest(keys=[b"k"])).slots[0].status == npb.SLOT_NOT_FOUND


def test_abandoned_holds_are_reclaimed(node, stub):
    stub.Allocate(npb.AllocateRequest(items=[npb.AllocItem(key=b"k", size=1 << 20)]))
    assert node.store.arena.used > 0
    import time

    deadline = time.monotonic() + 10
    while node.store.arena.used and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node.store.arena.used == 0 and node.holds.reaped == 1
