"""Stateful property test of MasterState: random events, invariants after every step."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvstore.master.state import MasterState
from kvstore.master.types import HeldKey, PutItem, Status, TierCapacity

NODES = ["a", "b", "c"]
KEYS = [bytes([i]) * 4 for i in range(12)]


class Master(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.s = MasterState(node_ttl_ms=1000, heartbeat_interval_ms=200, put_ttl_ms=400,
                             lease_ttl_ms=300)
        self.now = 0
        self.epochs: dict[str, int] = {}
        self.puts: list[int] = []
        self.leases: list[int] = []

    @rule(nid=st.sampled_from(NODES), cap=st.integers(0, 400),
          held=st.lists(st.sampled_from(KEYS), max_size=4))
    def register(self, nid: str, cap: int, held: list[bytes]) -> None:
        r = self.s.register_node(self.now, nid, f"h{nid}", "", [], [TierCapacity("dram", cap)],
                                 [HeldKey(k, 50, 1) for k in held])
        self.epochs[nid] = r.epoch

    @rule(nid=st.sampled_from(NODES), lost=st.lists(st.sampled_from(KEYS), max_size=2))
    def heartbeat(self, nid: str, lost: list[bytes]) -> None:
        if nid in self.epochs:
            self.s.heartbeat(self.now, nid, self.epochs[nid], lost=lost)

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4),
          size=st.sampled_from([0, 50, 120]), replicas=st.integers(1, 3))
    def put_start(self, keys: list[bytes], size: int, replicas: int) -> None:
        before = {k for k in keys if k in self.s._pending or k in self.s._objects}
        r = self.s.put_start(self.now, [PutItem(k, size, 1) for k in keys], replicas)
        ok = [k for k, p in zip(keys, r.placements, strict=True) if p.status == Status.OK]
        assert len(ok) == len(set(ok)), "one key reserved twice"
        assert not before & set(ok), "a held key was reserved again"
        for p in r.placements:
            if p.status == Status.OK:
                assert len({n.node_id for n in p.nodes}) == replicas
                for n in p.nodes:  # placement never overcommits a node
                    assert n.assigned_bytes <= n.capacity
        self.puts.append(r.put_id)

    @rule(data=st.data())
    def put_end(self, data: st.DataObject) -> None:
        if self.puts:
            pid = data.draw(st.sampled_from(self.puts))
            keys = data.draw(st.lists(st.sampled_from(KEYS), max_size=4))
            self.s.put_end(self.now, pid, keys)

    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        if self.puts:
            self.s.put_revoke(self.now, data.draw(st.sampled_from(self.puts)),
                              data.draw(st.lists(st.sampled_from(KEYS), max_size=4)))

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=4), lease=st.booleans())
    def lookup(self, keys: list[bytes], lease: bool) -> None:
        r = self.s.lookup(self.now, keys, lease)
        if r.lease_id:
            self.leases.append(r.lease_id)

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=3), force=st.booleans())
    def remove(self, keys: list[bytes], force: bool) -> None:
        self.s.remove(self.now, keys, force)

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=3), on=st.booleans())
    def pin(self, keys: list[bytes], on: bool) -> None:
        (self.s.pin if on else self.s.unpin)(self.now, keys)

    @rule()
    def release(self) -> None:
        self.s.release_leases(self.now, self.leases)
        self.leases = []

    @rule(ms=st.integers(0, 700))
    def advance(self, ms: int) -> None:
        self.now += ms
        self.s.tick(self.now)

    @invariant()
    def consistent(self) -> None:
        s = self.s
        if not hasattr(self, "s"):
            return
        s._advance(self.now)
        pending_charge: dict[str, int] = dict.fromkeys(s._nodes, 0)
        for res in s._reservations.values():
            for item in res.items.values():
                for nid, ep in item.targets:
                    if nid in s._nodes and s._nodes[nid].epoch == ep:
                        pending_charge[nid] += item.size
        for nid, node in s._nodes.items():
            complete = sum(s._objects[k].size for k in node.keys)
            assert node.assigned_bytes == complete + pending_charge[nid]
            assert node.assigned_bytes >= 0
        for key, obj in s._objects.items():
            assert obj.replicas, "object without replicas"
            assert len(set(obj.replicas)) == len(obj.replicas)
            for nid in obj.replicas:
                assert nid in s._nodes, "replica on a dead node"
                assert key in s._nodes[nid].keys
            assert obj.leases >= 0
            assert key not in s._pending
        assert set(s._lru) == set(s._objects)
        assert s.stats(self.now).bytes == sum(o.size for o in s._objects.values())
        assert s.stats(self.now).pins == sum(o.pinned for o in s._objects.values())


Master.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestMaster = Master.TestCase
