"""MasterState unit tests: no network, no clock (every call takes now_ms)."""

from __future__ import annotations

import pytest

from kvstore.master import codec
from kvstore.master.state import MasterState
from kvstore.master.types import Endpoint, HeldKey, PutItem, Status, TierCapacity

TTL = 1000


def mk(**kw: int) -> MasterState:
    kw.setdefault("node_ttl_ms", TTL)
    kw.setdefault("heartbeat_interval_ms", 200)
    kw.setdefault("put_ttl_ms", 500)
    kw.setdefault("lease_ttl_ms", 300)
    return MasterState(**kw)


def reg(s: MasterState, nid: str, cap: int = 1000, host: str = "", now: int = 0,
        held: list[HeldKey] | None = None) -> int:
    r = s.register_node(now, nid, host or f"host-{nid}", f"{nid}:1", [Endpoint("tcp", b"m", b"r")],
                        [TierCapacity("dram", cap)], held or [])
    return r.epoch


def put(s: MasterState, key: bytes, size: int = 100, now: int = 0, replicas: int = 1,
        host: str = "") -> list[str]:
    r = s.put_start(now, [PutItem(key, size, 7)], replicas, host)
    assert r.placements[0].status == Status.OK, r.placements[0]
    assert s.put_end(now, r.put_id, [key]) == [Status.OK]
    return [n.node_id for n in r.placements[0].nodes]


def test_put_visible_only_after_put_end():
    s = mk()
    reg(s, "a")
    r = s.put_start(0, [PutItem(b"k", 10, 1)])
    assert s.lookup(1, [b"k"]).locations[0].status == Status.NOT_FOUND
    assert s.longest_prefix(1, [b"k"]) == 0
    assert s.stats(1).pending == 1
    assert s.put_end(2, r.put_id, [b"k"]) == [Status.OK]
    loc = s.lookup(3, [b"k"]).locations[0]
    assert (loc.status, loc.size, loc.checksum, [n.node_id for n in loc.nodes]) == (
        Status.OK, 10, 1, ["a"])
    assert s.stats(3).pending == 0


def test_per_item_statuses():
    s = mk()
    reg(s, "a")
    put(s, b"done")
    r = s.put_start(0, [PutItem(b"done", 10, 1), PutItem(b"zero", 0, 1), PutItem(b"x", 10, 1),
                        PutItem(b"x", 10, 1), PutItem(b"huge", 10_000, 1)])
    assert [p.status for p in r.placements] == [
        Status.ALREADY_EXISTS, Status.INVALID, Status.OK, Status.BUSY, Status.NO_SPACE]


def test_exactly_one_concurrent_writer_wins():
    s = mk()
    reg(s, "a")
    r1 = s.put_start(0, [PutItem(b"k", 10, 1)])
    r2 = s.put_start(0, [PutItem(b"k", 10, 2)])
    assert [r1.placements[0].status, r2.placements[0].status] == [Status.OK, Status.BUSY]
    assert s.put_end(1, r2.put_id, [b"k"]) == [Status.EXPIRED]
    assert s.put_end(1, r1.put_id, [b"k"]) == [Status.OK]
    assert s.lookup(2, [b"k"]).locations[0].checksum == 1


def test_placement_prefers_client_host_then_free_space():
    s = mk()
    reg(s, "a", cap=1000, host="h1")
    reg(s, "b", cap=5000, host="h2")
    assert put(s, b"k1") == ["b"]  # most free
    assert put(s, b"k2", host="h1") == ["a"]  # same host first
    assert sorted(put(s, b"k3", replicas=2)) == ["a", "b"]
    assert s.put_start(0, [PutItem(b"k4", 10, 1)], 3).placements[0].status == Status.NO_SPACE


def test_assigned_bytes_charged_and_released():
    s = mk()
    reg(s, "a", cap=100)
    r = s.put_start(0, [PutItem(b"k", 60, 1)])
    assert s.stats(0).nodes[0].assigned_bytes == 60
    assert s.put_start(0, [PutItem(b"j", 60, 1)]).placements[0].status == Status.NO_SPACE
    assert s.put_revoke(1, r.put_id, [b"k"]) == [Status.OK]
    assert s.put_revoke(1, r.put_id, [b"k"]) == [Status.EXPIRED]
    assert s.stats(1).nodes[0].assigned_bytes == 0
    # the node is told to delete whatever bytes of the revoked put arrived
    assert s.heartbeat(2, "a", 1).remove == [b"k"]


def test_reservation_expires():
    s = mk()
    reg(s, "a", cap=100)
    r = s.put_start(0, [PutItem(b"k", 60, 1)])
    assert r.expires_ms == 500
    s.heartbeat(400, "a", 1)
    t = s.tick(600)
    assert t.expired_reservations == 1
    assert s.put_end(600, r.put_id, [b"k"]) == [Status.EXPIRED]
    assert s.stats(600).nodes[0].assigned_bytes == 0
    assert s.put_start(600, [PutItem(b"k", 60, 1)]).placements[0].status == Status.OK


def test_lru_eviction_skips_leased_and_pinned():
    s = mk()
    reg(s, "a", cap=300)
    for k in (b"k1", b"k2", b"k3"):
        put(s, k)
    s.pin(0, [b"k1"])
    lease = s.lookup(0, [b"k2"], lease=True)
    assert lease.lease_id
    put(s, b"k4")  # evicts k3: k1 pinned, k2 leased
    assert s.longest_prefix(0, [b"k1", b"k2", b"k4"]) == 3
    assert s.lookup(0, [b"k3"]).locations[0].status == Status.NOT_FOUND
    assert s.counters["evictions"] == 1
    assert s.heartbeat(0, "a", 1).remove == [b"k3"]
    s.lookup(0, [b"k4"], lease=True)
    # nothing evictable left: NO_SPACE and nothing evicted
    assert s.put_start(0, [PutItem(b"k5", 100, 1)]).placements[0].status == Status.NO_SPACE
    s.release_leases(0, [lease.lease_id])
    put(s, b"k5")
    assert s.lookup(0, [b"k2"]).locations[0].status == Status.NOT_FOUND


def test_lookup_touches_lru():
    s = mk()
    reg(s, "a", cap=200)
    put(s, b"old")
    put(s, b"new")
    s.lookup(0, [b"old"])
    put(s, b"third")
    assert s.longest_prefix(0, [b"old"]) == 1
    assert s.longest_prefix(0, [b"new"]) == 0


def test_remove_leased_pinned_force():
    s = mk()
    reg(s, "a")
    put(s, b"p")
    put(s, b"l")
    s.pin(0, [b"p"])
    s.lookup(0, [b"l"], lease=True)
    assert s.remove(0, [b"p", b"l", b"none"]) == [Status.PINNED, Status.LEASED, Status.NOT_FOUND]
    assert s.remove(0, [b"p", b"l"], force=True) == [Status.PINNED, Status.OK]
    assert s.heartbeat(1, "a", 1).remove == [b"l"]
    assert s.unpin(0, [b"p"]) == [Status.OK]
    assert s.remove(0, [b"p"]) == [Status.OK]
    assert s.stats(0).objects == 0 and s.stats(0).bytes == 0


def test_lease_expires():
    s = mk()
    reg(s, "a")
    put(s, b"k")
    r = s.lookup(0, [b"k", b"miss"], lease=True)
    assert r.lease_expires_ms == 300
    assert s.stats(0).leases == 1
    assert s.remove(100, [b"k"]) == [Status.LEASED]
    assert s.tick(300).expired_leases == 1
    assert s.remove(300, [b"k"]) == [Status.OK]
    assert s.lookup(0, [b"miss"], lease=True).lease_id == 0  # nothing found, no lease


def test_node_ttl_expiry_drops_replicas():
    s = mk()
    reg(s, "a")
    reg(s, "b")
    put(s, b"both", replicas=2)
    s.heartbeat(900, "b", 2)
    assert s.longest_prefix(999, [b"both"]) == 1
    t = s.tick(1000)  # a silent since 0: dead; b heartbeated at 900
    assert t.dead_nodes == ["a"]
    loc = s.lookup(1000, [b"both"]).locations[0]
    assert [n.node_id for n in loc.nodes] == ["b"]
    assert s.stats(1000).counters["dead_nodes"] == 1
    assert s.heartbeat(1001, "a", 1).reregister


def test_dead_node_checked_before_any_answer():
    s = mk()
    reg(s, "a")
    put(s, b"k")
    assert s.longest_prefix(1000, [b"k"]) == 0  # no tick needed
    assert s.tick(1000).dead_nodes == ["a"]


def test_stale_epoch_reregister_and_reconcile():
    s = mk()
    e1 = reg(s, "a")
    put(s, b"keep")
    put(s, b"gone")  # the node lost it across its restart
    e2 = reg(s, "a", now=10, held=[HeldKey(b"keep", 100, 7), HeldKey(b"stray", 5, 5),
                                   HeldKey(b"gone-size", 1, 1)])
    assert e2 > e1
    assert s.heartbeat(11, "a", e1).reregister
    assert not s.heartbeat(11, "a", e2).reregister
    assert s.longest_prefix(11, [b"keep"]) == 1
    assert s.lookup(11, [b"gone"]).locations[0].status == Status.NOT_FOUND
    # keys the master never knew (a put whose end it missed) are adopted: the node verified them
    assert s.longest_prefix(11, [b"stray"]) == s.longest_prefix(11, [b"gone-size"]) == 1
    assert s.stats(11).nodes[0].assigned_bytes == 106


def test_reregister_after_death_adopts_what_the_node_holds():
    s = mk()
    reg(s, "a")
    put(s, b"k")
    put(s, b"removed")
    assert s.remove(1, [b"removed"]) == [Status.OK]
    s.tick(2000)  # declared dead: the master forgets its replicas
    assert s.longest_prefix(2000, [b"k"]) == 0
    r = s.register_node(2001, "a", "h", "a:1", [], [TierCapacity("dram", 1000)],
                        [HeldKey(b"k", 100, 7), HeldKey(b"removed", 100, 7)])
    assert r.drop == [b"removed"]  # removed while the node was away: never brought back
    assert r.epoch == 2
    assert s.longest_prefix(2002, [b"k"]) == 1
    assert s.counters["adopted_on_register"] == 1
    assert any(k == codec.OBJECT + b"k" and v is not None for k, v in s.take_journal())  # persisted


def test_reregister_adopts_a_replica_the_master_dropped() -> None:
    s = mk()
    reg(s, "a")
    reg(s, "b")
    put(s, b"k", replicas=2)
    s.heartbeat(900, "b", 2)
    s.tick(1500)  # a is dead, b lives on
    assert [n.node_id for n in s.lookup(1500, [b"k"]).locations[0].nodes] == ["b"]
    r = s.register_node(1501, "a", "h", "a:1", [], [TierCapacity("dram", 1000)], [HeldKey(b"k", 100, 7)])
    assert r.drop == []
    assert sorted(n.node_id for n in s.lookup(1502, [b"k"]).locations[0].nodes) == ["a", "b"]


def test_a_held_key_being_rewritten_is_dropped() -> None:
    s = mk()
    reg(s, "a")
    reg(s, "b")
    s.put_start(0, [PutItem(b"k", 10, 1)])  # another writer holds the key
    r = s.register_node(1, "b", "h", "b:1", [], [TierCapacity("dram", 1000)], [HeldKey(b"k", 20, 9)])
    assert r.drop == [b"k"]


def test_a_master_pause_is_not_the_nodes_fault() -> None:
    s = mk(pause_ms=TTL // 2)
    reg(s, "a")
    put(s, b"k")
    s.tick(400)
    s.tick(5000)  # nothing ran for 4.6 s: the master was paused
    assert s.counters["pauses"] == 1 and s.counters["dead_nodes"] == 0
    assert s.longest_prefix(5001, [b"k"]) == 1
    for t in range(5400, 5000 + TTL + 2, 300):  # the master runs on; the node stays silent
        s.tick(t)
    s.tick(5000 + TTL + 1)  # a node silent for a full TTL after the resume is dead
    assert s.counters["dead_nodes"] == 1
    off = mk()  # without pause detection (the default): the same jump kills the node
    reg(off, "a")
    off.tick(5000)
    assert off.counters["dead_nodes"] == 1


def test_checksum_mismatch_dropped_at_register():
    s = mk()
    reg(s, "a")
    put(s, b"k")
    r = s.register_node(1, "a", "h", "a:1", [], [TierCapacity("dram", 1000)],
                        [HeldKey(b"k", 100, 8)])
    assert r.drop == [b"k"]
    assert s.longest_prefix(1, [b"k"]) == 0


def test_put_end_after_target_reregistered_is_expired():
    s = mk()
    reg(s, "a")
    r = s.put_start(0, [PutItem(b"k", 10, 1)])
    reg(s, "a", now=1)  # restarted while the client was writing
    assert s.put_end(2, r.put_id, [b"k"]) == [Status.EXPIRED]
    assert s.stats(2).nodes[0].assigned_bytes == 0


def test_heartbeat_lost_removes_replica():
    s = mk()
    reg(s, "a")
    reg(s, "b")
    put(s, b"k", replicas=2)
    s.heartbeat(1, "a", 1, lost=[b"k", b"unknown"])
    assert [n.node_id for n in s.lookup(1, [b"k"]).locations[0].nodes] == ["b"]
    s.heartbeat(1, "b", 2, lost=[b"k"])
    assert s.longest_prefix(1, [b"k"]) == 0
    assert s.stats(1).bytes == 0


def test_longest_prefix_stops_at_first_miss():
    s = mk()
    reg(s, "a", cap=10_000)
    for k in (b"1", b"2", b"4"):
        put(s, k, size=1)
    assert s.longest_prefix(0, [b"1", b"2", b"3", b"4"]) == 2
    assert s.longest_prefix(0, []) == 0


def test_queued_remove_cancelled_by_new_placement():
    s = mk()
    reg(s, "a")
    put(s, b"k")
    s.remove(0, [b"k"])
    put(s, b"k")  # same key on the same node before its heartbeat
    assert s.heartbeat(1, "a", 1).remove == []


def test_journal_roundtrip_restores_state():
    s = mk()
    reg(s, "a")
    reg(s, "b")
    put(s, b"k1", replicas=2)
    put(s, b"k2")
    s.pin(0, [b"k2"])
    db: dict[bytes, bytes] = {}
    for k, v in s.take_journal():
        if v is None:
            db.pop(k, None)
        else:
            db[k] = v
    assert s.take_journal() == []
    t = mk()
    t.restore(sorted(db.items()), 5000)
    st = t.stats(5000)
    assert (st.objects, st.pins, len(st.nodes)) == (2, 1, 2)
    assert t.longest_prefix(5000, [b"k1", b"k2"]) == 2
    # loaded nodes keep their epoch for one TTL from the restart
    assert not t.heartbeat(5500, "a", 1).reregister
    assert t.tick(6000).dead_nodes == ["b"]
    assert t.lookup(6000, [b"k2"]).locations[0].status in (Status.OK, Status.NOT_FOUND)
    assert [n.node_id for n in t.lookup(6000, [b"k1"]).locations[0].nodes] == ["a"]
    # new epochs and ids never repeat old ones
    assert reg(t, "c", now=6000) > 2
    assert t.put_start(6000, []).put_id >> 40 > s.put_start(0, []).put_id >> 40


def test_restore_rejects_garbage():
    from kvstore.errors import Corruption

    with pytest.raises(Corruption):
        mk().restore([(codec.OBJECT + b"k", b"\xc1")], 0)


def test_report_bad_drops_only_that_replica_of_that_version() -> None:
    s = mk()
    reg(s, "a")
    e_b = reg(s, "b")
    put(s, b"k", replicas=2)
    assert s.report_bad(1, [(b"k", "a", 8)]) == [Status.NOT_FOUND]  # another version: ignored
    assert s.report_bad(1, [(b"k", "zz", 7)]) == [Status.NOT_FOUND]
    assert s.report_bad(1, [(b"k", "a", 7)]) == [Status.OK]
    assert [n.node_id for n in s.lookup(2, [b"k"]).locations[0].nodes] == ["b"]
    assert s.heartbeat(3, "a", 1).remove == [b"k"]  # the node is told to drop its copy
    assert s.report_bad(4, [(b"k", "a", 7)]) == [Status.NOT_FOUND]  # already gone
    assert s.report_bad(4, [(b"k", "b", 7)]) == [Status.OK]
    assert s.longest_prefix(5, [b"k"]) == 0 and s.counters["bad_replicas"] == 2
    assert not s.heartbeat(6, "b", e_b).reregister


def test_checksum_at_end_comes_with_put_end() -> None:
    """A key reserved with checksum_at_end becomes visible with the checksum its PutEnd
    gives; without one, or with one that contradicts PutStart's, it stays reserved."""
    s = mk()
    reg(s, "a")
    r = s.put_start(0, [PutItem(b"late", 10, 0, checksum_at_end=True), PutItem(b"early", 10, 5)])
    assert [p.status for p in r.placements] == [Status.OK, Status.OK]
    assert s.put_end(0, r.put_id, [b"late", b"early"]) == [Status.INVALID, Status.OK]
    assert s.put_end(0, r.put_id, [b"late"], [99]) == [Status.OK]
    assert [loc.checksum for loc in s.lookup(0, [b"late", b"early"]).locations] == [99, 5]
    r = s.put_start(0, [PutItem(b"fixed", 10, 5)])
    assert s.put_end(0, r.put_id, [b"fixed"], [6]) == [Status.INVALID]
    assert s.put_end(0, r.put_id, [b"fixed"], [5]) == [Status.OK]


def test_put_start_never_evicts_a_key_it_names():
    """Making room for one item of a PutStart must not evict a key the same call names
    (it would then be reserved and written again): found by the invariants machine."""
    s = mk()
    reg(s, "a", cap=100, held=[HeldKey(b"old", 50, 1), HeldKey(b"older", 50, 1)])
    r = s.put_start(0, [PutItem(b"new", 50, 1), PutItem(b"old", 50, 1)])
    assert [p.status for p in r.placements] == [Status.OK, Status.ALREADY_EXISTS]
    assert b"old" in s._objects and b"older" not in s._objects
