"""The node's control channel against bad and hostile requests (real sockets, in-process node)."""

import socket
import time

import msgpack
import numpy as np
import pytest

from kvstore.checksum import BLOCK, checksum
from kvstore.config import NodeConfig, StoreConfig
from kvstore.errors import InvalidArgument
from kvstore.framing import HEADER
from kvstore.node.control import ControlClient, FetchRequest, StoreRequest
from kvstore.node.daemon import StoreNode
from kvstore.node.protocol import (
    MAGIC,
    Acquired,
    Allocated,
    Maps,
    Op,
    SlotStatus,
    pack_frame,
)
from kvstore.testing.cluster import free_port
from transport.regions import RemoteRegion

S = SlotStatus


@pytest.fixture
def node():
    # No master: the node serves regardless and keeps trying to register.
    n = StoreNode(NodeConfig(master=f"127.0.0.1:{free_port()}", transports=("shm://", "tcp://"), metrics_port=-1,
                             hold_ttl=1.0),
                  StoreConfig(dram="8MiB", prefault=False)).start(register_timeout=0.1)
    yield n
    n.stop()


@pytest.fixture
def ctl(node):
    c = ControlClient(node.control_address)
    yield c
    c.close()


def test_allocate_commit_acquire_release(node, ctl):
    data = np.arange(1000, dtype=np.uint8)
    [slot] = [Allocated(*s) for s in ctl.call(Op.ALLOCATE, [[b"k", data.nbytes]], 5)]
    assert slot.status == S.OK and slot.generation == node.store.arena.generation(slot.offset) > 0
    node.store.arena.buffer[slot.offset:slot.offset + data.nbytes] = data
    assert ctl.call(Op.COMMIT, [[slot.handle, b"k", checksum(data, b"k")]], 5) == [S.OK]
    got = [Acquired(*s) for s in ctl.call(Op.ACQUIRE, [b"k", b"missing"], 5)]
    assert got[0].status == S.OK and got[0].size == 1000 and got[0].checksum == checksum(data, b"k")
    assert (got[0].offset, got[0].generation) == (slot.offset, slot.generation)  # a commit keeps it
    assert got[1].status == S.NOT_FOUND
    assert ctl.call(Op.RELEASE, [got[0].handle, 999], 5) == [S.OK, S.EXPIRED]
    # REMOVE (sent by the client that removed the key through the master) retires the extent.
    assert ctl.call(Op.REMOVE, [b"k", b"missing", 7], 5) == [S.OK, S.NOT_FOUND, S.INVALID]
    assert node.store.arena.generation(slot.offset) != slot.generation and not node.store.exists(b"k")


def test_maps_names_the_generation_table(node, ctl):
    shm, tcp = (Maps(*m) for m in ctl.call(Op.MAPS, ["shm", "tcp"], 5))
    assert shm.status == S.OK and shm.granule == node.store.arena.alignment
    assert RemoteRegion.from_bytes(shm.generations).nbytes >= node.store.arena.generations.nbytes
    assert tcp.status == S.INVALID  # not a memory peers map


def test_bad_items_and_checksums(node, ctl):
    slots = ctl.call(Op.ALLOCATE, [[b"", 10], [b"x" * 300, 10], [b"z", 0], [b"big", 1 << 40], ["str", 5],
                                   [b"k"], 7], 5)
    assert [s[0] for s in slots] == [S.INVALID] * 7
    [[_, handle, _, _]] = ctl.call(Op.ALLOCATE, [[b"k", 100]], 5)
    # Wrong checksum: refused, nothing stored, space returned.
    assert ctl.call(Op.COMMIT, [[handle, b"k", 1]], 5) == [S.CORRUPT]
    assert not node.store.exists(b"k")
    # Committing a handle under another key, or twice, is refused.
    [[_, handle, _, _]] = ctl.call(Op.ALLOCATE, [[b"k", 100]], 5)
    assert ctl.call(Op.COMMIT, [[handle, b"other", 1]], 5) == [S.EXPIRED]
    assert ctl.call(Op.COMMIT, [[handle, b"k", 1]], 5) == [S.EXPIRED]
    assert ctl.call(Op.COMMIT, [[-1, b"k", 1], "junk"], 5) == [S.EXPIRED, S.INVALID]
    assert node.store.arena.used == 0


@pytest.mark.parametrize("frame", [
    b"GET / HTTP/1.1\r\n\r\n",                                              # not our protocol
    HEADER.pack(MAGIC, 9, 1, 0, 0),                                          # unknown version
    HEADER.pack(MAGIC, 1, 1, 0, 1 << 30),                                    # oversize frame
    pack_frame(Op.ACQUIRE, msgpack.packb([b"k"] * 70000)),                   # oversize batch
    pack_frame(Op.ACQUIRE, b"\xc1\xc1\xc1"),                                 # not msgpack
    pack_frame(Op.ACQUIRE, msgpack.packb({"a": 1})),                         # not a list
    pack_frame(77, msgpack.packb([])),                                       # unknown op
])
def test_hostile_frames_are_refused_and_node_keeps_serving(node, ctl, frame):
    host, port = node.control_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(frame)
        s.settimeout(5)
        reply = s.recv(1 << 16)
        assert reply == b"" or reply[:4] == MAGIC  # an error reply or a hang-up, never a crash
    assert ctl.call(Op.ACQUIRE, [b"k"], 5)[0][0] == S.NOT_FOUND


def test_client_surfaces_error_replies():
    import threading

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()

    def serve():
        conn, _ = lsock.accept()
        conn.recv(1 << 16)
        conn.sendall(pack_frame(0x80, msgpack.packb("bad request: nope"), 1))
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    c = ControlClient(f"127.0.0.1:{lsock.getsockname()[1]}")
    with pytest.raises(InvalidArgument, match="nope"):
        c.call(Op.ACQUIRE, [b"k"], 5)
    lsock.close()


def test_abandoned_holds_are_reclaimed(node, ctl):
    ctl.call(Op.ALLOCATE, [[b"k", 1 << 20]], 5)
    assert node.store.arena.used > 0
    deadline = time.monotonic() + 10
    while node.store.arena.used and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node.store.arena.used == 0 and node.holds.reaped == 1


def test_fetch_streams_bytes_in_one_round_trip(node, ctl):
    a = np.random.default_rng(0).integers(0, 256, 3 * BLOCK + 1000, dtype=np.uint8)
    b = np.full(5000, 7, np.uint8)
    node.store.put(b"a", a)
    node.store.put(b"b", b)
    ca, cb = checksum(a, b"a"), checksum(b, b"b")
    dst_a, dst_b, small = bytearray(len(a)), bytearray(len(b)), bytearray(10)
    part = bytearray(10 + BLOCK + 20)
    got = ctl.fetch([FetchRequest(b"a", ca, memoryview(dst_a)), FetchRequest(b"missing", 1, None),
                     FetchRequest(b"b", 12345, memoryview(dst_b)), FetchRequest(b"b", cb, memoryview(small)),
                     FetchRequest(b"b", cb, memoryview(dst_b)),
                     # two ranges of "a" back to back: within a block, and across two blocks
                     FetchRequest(b"a", ca, memoryview(part), [(5, 10), (2 * BLOCK - 7, BLOCK + 20)]),
                     FetchRequest(b"a", ca, memoryview(bytearray(5)), [(len(a) - 2, 5)])], 5)
    assert [(f.status, ok) for f, ok in got] == [
        (S.OK, True), (S.NOT_FOUND, False), (S.EXPIRED, False),
        (S.OK, False),  # did not fit its destination: drained, not landed
        (S.OK, True), (S.OK, True),
        (S.EXPIRED, False)]  # a range past the end
    assert bytes(dst_a) == a.tobytes() and bytes(dst_b) == b.tobytes()
    assert bytes(part) == a[5:15].tobytes() + a[2 * BLOCK - 7:3 * BLOCK + 13].tobytes()
    # The stream stayed in step, and every hold was let go.
    assert ctl.call(Op.ACQUIRE, [b"missing"], 5)[0][0] == S.NOT_FOUND
    assert len(node.holds) == 0 and all(x.refs == 1 for x in node.store.arena.live())
    # A malformed ranged item is INVALID; the connection stays usable.
    [(f, ok)] = ctl.fetch([FetchRequest(b"a", ca, memoryview(part), [(0, 0)])], 5)
    assert f.status == S.INVALID and not ok


def test_fetch_rejects_bytes_that_do_not_match_their_block_sums(node, ctl):
    a = np.random.default_rng(1).integers(0, 256, 2 * BLOCK, dtype=np.uint8)
    node.store.put(b"a", a)
    off = node.store.location(b"a")[0]
    node.store.arena.buffer[off + BLOCK + 3] ^= 0xFF  # a flipped byte in the second block
    first, second = bytearray(100), bytearray(100)
    got = ctl.fetch([FetchRequest(b"a", checksum(a, b"a"), memoryview(first), [(10, 100)]),
                     FetchRequest(b"a", checksum(a, b"a"), memoryview(second), [(BLOCK, 100)])], 5)
    assert [ok for _, ok in got] == [True, False]  # the intact block still verifies
    assert bytes(first) == a[10:110].tobytes()


def test_store_carries_the_bytes_in_one_round_trip(node, ctl):
    a = np.random.default_rng(2).integers(0, 256, 2 * BLOCK + 17, dtype=np.uint8)
    b = np.ones(100, np.uint8)
    huge = np.zeros(6 << 20, np.uint8)  # more than the 8 MiB node has free (the rest is pinned)
    node.store.put(b"filler", np.zeros(3 << 20, np.uint8), pin=True)
    got = ctl.store([StoreRequest(b"huge", checksum(huge, b"huge"), huge.data),
                     StoreRequest(b"a", checksum(a, b"a"), a.data), StoreRequest(b"b", 12345, b.data),
                     StoreRequest(b"b2", checksum(b, b"b2"), b.data)], 5)
    assert [s.status for s in got] == [S.NO_SPACE, S.OK, S.CORRUPT, S.OK]
    assert node.store.get(b"a") == a.tobytes() and node.store.get(b"b2") == b.tobytes()
    assert not node.store.exists(b"b") and not node.store.exists(b"huge")
    assert (got[1].offset, got[1].generation) == node.store.location(b"a")[::3]
    assert got[1].checksum == checksum(a, b"a")
    # no checksum given: the node commits the one of what landed, answers it, and the
    # sender's hasher saw the same bytes (hashed piece by piece, after each went out)
    from kvstore.checksum import hasher

    h = hasher(b"c")
    c = np.random.default_rng(3).integers(0, 256, 3 * (1 << 20) + 5, dtype=np.uint8)
    [done] = ctl.store([StoreRequest(b"c", None, c.data, None, h)], 5)
    assert done.status == S.OK and done.checksum == checksum(c, b"c") == h.intdigest()
    assert node.store.get(b"c") == c.tobytes()
    # A malformed item: the request is refused and the connection closed (the bytes that
    # follow can no longer be framed); nothing is stored.
    with pytest.raises(InvalidArgument):
        ctl.store([StoreRequest(b"", 1, b.data)], 5)
    assert ctl.call(Op.ACQUIRE, [b"a"], 5)[0][0] == S.OK  # a fresh connection works
