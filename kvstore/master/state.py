"""The master's state machine: sans-I/O, events in, results out.

:class:`MasterState` holds nodes, complete objects, reservations, read leases,
pins and an LRU; the gRPC servicer only translates to and from it. Nothing here
reads a clock, opens a socket or starts a thread: every method takes ``now_ms``
(the master's clock) and returns plain values from :mod:`kvstore.master.types`.
Not thread-safe: one caller (the servicer's event loop) drives it.

Invariants (tested in ``tests/master``):

* every replica of a visible object is on a live node (a node past its TTL is
  dropped before any call looks at it, with its replicas);
* a node's ``assigned_bytes`` is the sum of its complete replicas plus the
  pending reservations placed on it in its current epoch;
* a key is complete, pending in exactly one reservation, or absent;
* a leased or pinned object is never evicted; a pinned one is never removed.

Durable changes are appended to a journal of ``(db_key, value | None)`` records
(:mod:`kvstore.master.codec`) that the caller drains with :meth:`take_journal`
and writes in one batch after each call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvstore.master import codec
from kvstore.master.placement import choose_nodes, eviction_victims
from kvstore.master.types import (
    Endpoint,
    Event,
    HeartbeatResult,
    HeldKey,
    Location,
    LookupResult,
    Node,
    Placement,
    PutItem,
    PutStartResult,
    RegisterResult,
    Stats,
    Status,
    TickResult,
    TierCapacity,
)

__all__ = ["MasterState"]


@dataclass(slots=True, eq=False)
class _Object:
    size: int
    checksum: int
    replicas: list[str]
    pinned: bool = False
    leases: int = 0


@dataclass(slots=True, eq=False)
class _Pending:
    size: int
    checksum: int | None  # None: the writer sends it with PutEnd
    targets: tuple[tuple[str, int], ...]  # (node_id, epoch at PutStart)


@dataclass(slots=True, eq=False)
class _Reservation:
    expires_ms: int
    items: dict[bytes, _Pending] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class _Lease:
    expires_ms: int
    objects: list[_Object]


_COUNTERS = (
    "lookups", "hits", "misses", "prefix_queries", "put_starts", "puts", "no_space",
    "evictions", "removes", "expired_reservations", "expired_leases", "dead_nodes",
    "registrations", "reregisters", "dropped_on_register", "lost_replicas", "adopted_on_register",
    "pauses", "bad_replicas",
)
_TOMBSTONES = 100_000
"""Recently removed keys remembered so a node that missed the removal cannot bring them back."""


def key_scope(key: bytes) -> bytes:
    """The tenant scope a key belongs to (``@NAME/``, see kvstore.auth), or b""."""
    if key[:1] != b"@":
        return b""
    end = key.find(b"/", 1, 66)
    return key[: end + 1] if end > 0 else b""


class MasterState:
    """All of the master's metadata. See the module docstring for the contract.

    Args:
        node_ttl_ms: a node without a heartbeat for this long is dead.
        heartbeat_interval_ms: told to nodes at registration.
        put_ttl_ms: lifetime of a PutStart reservation.
        lease_ttl_ms: lifetime of a Lookup read lease.
        max_replicas: the most replicas one PutStart may ask for (callers validate).
    """

    def __init__(
        self,
        *,
        node_ttl_ms: int = 10_000,
        heartbeat_interval_ms: int = 2_000,
        put_ttl_ms: int = 30_000,
        lease_ttl_ms: int = 5_000,
        max_replicas: int = 8,
        pause_ms: int | None = None,
    ) -> None:
        self.node_ttl_ms = node_ttl_ms
        self.pause_ms = pause_ms
        """A gap this long between two calls means the master itself was not running
        (paused, starved, suspended): every node then gets a fresh TTL before any expiry,
        since it could not have reached the master. ``None``: off (callers with their
        own clock, as the unit tests, step time freely)."""
        self._last_now_ms: int | None = None
        self.paused_ms = 0
        """Length of the last pause detected (for the log)."""
        self._removed: OrderedDict[bytes, None] = OrderedDict()
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.put_ttl_ms = put_ttl_ms
        self.lease_ttl_ms = lease_ttl_ms
        self.max_replicas = max_replicas
        self._nodes: dict[str, Node] = {}
        self._objects: dict[bytes, _Object] = {}
        self._lru: OrderedDict[bytes, None] = OrderedDict()  # complete keys, oldest first
        self._pending: dict[bytes, int] = {}  # key -> put_id
        self._reservations: dict[int, _Reservation] = {}  # insertion order ~ expiry order
        self._leases: dict[int, _Lease] = {}  # insertion order ~ expiry order
        self._bytes = 0
        self._pins = 0
        self.pins_to_restore: dict[bytes, int] = {}
        """key -> checksum of the pinned version: pins a newly elected leader read from etcd,
        restored as the nodes re-register those versions (see :meth:`pinned_version`)."""
        self._next_epoch = 1
        self._generation = 1
        self._next_id = (1 << 40) + 1
        self._next_node_check = 0
        self._journal: list[codec.Record] = []
        self._events: list[Event] = []  # for the event stream (kvstore.master.events)
        self._scope_bytes: dict[bytes, int] = {}  # complete bytes per tenant key scope (@NAME/)
        self._scope_pins: dict[bytes, int] = {}  # pinned objects per scope
        self._scope_pending: dict[bytes, int] = {}  # keys reserved by puts not yet ended, per scope
        self._scope_objects: dict[bytes, int] = {}
        self._dead: list[str] = []
        self._expired_res = 0
        self._expired_leases = 0
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)

    # -- persistence ------------------------------------------------------------

    def restore(self, records: Iterable[tuple[bytes, bytes]], now_ms: int) -> None:
        """Load persisted records into an empty state (before any other call).

        Every loaded node gets one TTL from ``now_ms`` to heartbeat with its
        epoch; replicas on unknown nodes are dropped. Raises
        :class:`~kvstore.errors.Corruption` on an undecodable record.
        """
        objects: list[tuple[bytes, bytes]] = []
        self._generation += 1  # ids of this run never repeat a previous run's
        for k, v in records:
            if k.startswith(codec.NODE):
                epoch, host, control, eps, tiers = codec.decode_node(v)
                nid = k[len(codec.NODE):].decode()
                self._nodes[nid] = Node(nid, epoch, host, control, eps, tiers,
                                        now_ms, now_ms + self.node_ttl_ms)
                self._next_epoch = max(self._next_epoch, epoch + 1)
            elif k.startswith(codec.OBJECT):
                objects.append((k[len(codec.OBJECT):], v))
            elif k == codec.META_EPOCH:
                self._next_epoch = max(self._next_epoch, codec.decode_int(v, "epoch"))
            elif k == codec.META_GEN:
                self._generation = max(self._generation, codec.decode_int(v, "gen") + 1)
        for key, v in objects:
            size, checksum, replicas, pinned = codec.decode_object(v)
            live = [r for r in dict.fromkeys(replicas) if r in self._nodes]
            if not live:
                self._journal.append((codec.OBJECT + key, None))
                continue
            obj = _Object(size, checksum, live, pinned)
            self._add_object(key, obj)
            if live != replicas:
                self._persist_object(key, obj)
        self._next_id = (self._generation << 40) + 1
        self._journal.append(codec.meta_record(codec.META_GEN, self._generation))
        self._next_node_check = now_ms + self.node_ttl_ms

    def scope_bytes(self, scope: bytes) -> int:
        """Bytes of complete objects whose keys start with ``scope`` (a tenant's ``@NAME/``)."""
        return self._scope_bytes.get(scope, 0)

    def scope_objects(self, scope: bytes) -> int:
        return self._scope_objects.get(scope, 0)

    def scope_pins(self, scope: bytes) -> int:
        """Pinned objects whose keys start with ``scope``."""
        return self._scope_pins.get(scope, 0)

    def scope_pending(self, scope: bytes) -> int:
        """Keys starting with ``scope`` that puts have reserved and not yet ended."""
        return self._scope_pending.get(scope, 0)

    @staticmethod
    def _bump(counts: dict[bytes, int], key: bytes, delta: int) -> None:
        scope = key_scope(key)
        if scope and delta:
            n = counts.get(scope, 0) + delta
            if n > 0:
                counts[scope] = n
            else:
                counts.pop(scope, None)

    def _count_scope(self, key: bytes, delta: int) -> None:
        """An object of ``delta`` bytes (negative: gone) under ``key``'s tenant scope."""
        self._bump(self._scope_objects, key, 1 if delta > 0 else -1)
        self._bump(self._scope_bytes, key, delta)

    def take_events(self) -> list[Event]:
        """What happened to chunks and nodes since the last call, in order."""
        out, self._events = self._events, []
        return out

    def _emit(self, kind: str, key: bytes = b"", size: int = 0, nodes: Sequence[str] = ()) -> None:
        self._events.append(Event(kind, key, size, tuple(nodes)))

    def take_journal(self) -> list[codec.Record]:
        """Drain the durable changes made since the last call, in order. Never raises."""
        out, self._journal = self._journal, []
        return out

    # -- nodes ------------------------------------------------------------------

    def register_node(
        self,
        now_ms: int,
        node_id: str,
        host: str,
        control_address: str,
        endpoints: Sequence[Endpoint],
        tiers: Sequence[TierCapacity],
        held: Sequence[HeldKey] = (),
        complete: bool = True,
    ) -> RegisterResult:
        """(Re-)register a node under a new epoch and reconcile what it holds.

        The node is the source of truth for its bytes: a held key the master lists with
        the same size and checksum stays (and is listed on this node again if the master
        had dropped it); one the master does not know is adopted, unless another writer
        holds it or it was removed while the node was away; every other held key is
        returned in ``drop``. Replicas the node no longer holds go away once its whole
        list is in: now, or with the last :meth:`report_held` page when ``complete`` is
        False (a node holding more keys than one message carries). Reservations placed
        on an earlier epoch of the node no longer count.
        """
        self._advance(now_ms)
        old = self._nodes.get(node_id)
        epoch = self._next_epoch
        self._next_epoch += 1
        self._journal.append(codec.meta_record(codec.META_EPOCH, self._next_epoch))
        node = Node(node_id, epoch, host, control_address, tuple(endpoints), tuple(tiers),
                    now_ms, now_ms + self.node_ttl_ms)
        if old is not None:  # keep the listing until the node says what it no longer holds
            node.keys = set(old.keys)
            node.unconfirmed = set(old.keys)
            node.assigned_bytes = sum(self._objects[k].size for k in old.keys)
        self._nodes[node_id] = node
        drop = self._reconcile(node, held)
        if complete:
            self._confirm(node)
        self._journal.append(codec.node_record(node_id, epoch, host, control_address,
                                               node.endpoints, node.tiers))
        self._next_node_check = min(self._next_node_check, node.deadline_ms)
        self.counters["registrations"] += 1
        self._emit("NODE_JOINED", nodes=[node_id])
        return RegisterResult(epoch, self.heartbeat_interval_ms, self.node_ttl_ms, drop)

    def report_held(self, now_ms: int, node_id: str, epoch: int, held: Sequence[HeldKey],
                    last: bool) -> tuple[bool, list[bytes]]:
        """One more page of a paged registration: ``(reregister, drop)`` as for
        :meth:`register_node`. ``reregister`` for an unknown node or a stale epoch."""
        self._advance(now_ms)
        node = self._nodes.get(node_id)
        if node is None or node.epoch != epoch:
            return True, []
        node.last_heartbeat_ms = now_ms
        node.deadline_ms = now_ms + self.node_ttl_ms
        drop = self._reconcile(node, held)
        if last:
            self._confirm(node)
        return False, drop

    def _reconcile(self, node: Node, held: Sequence[HeldKey]) -> list[bytes]:
        node_id = node.node_id
        drop: list[bytes] = []
        for h in held:
            obj = self._objects.get(h.key)
            if h.key in node.unconfirmed:
                node.unconfirmed.discard(h.key)
                if obj is not None and obj.size == h.size and obj.checksum == h.checksum:
                    continue
                self._drop_replica(h.key, node_id)
                drop.append(h.key)
                continue
            if h.key in node.keys:
                continue
            if obj is not None and obj.size == h.size and obj.checksum == h.checksum:
                # the master had dropped this replica (the node was declared dead)
                obj.replicas.append(node_id)
                node.keys.add(h.key)
                node.assigned_bytes += obj.size
                self._persist_object(h.key, obj)
                self._emit("STORED", h.key, obj.size, [node_id])
                self.counters["adopted_on_register"] += 1
            elif obj is None and h.key not in self._pending and h.key not in self._removed and h.size > 0:
                # the master forgot it: the node is the truth (pinned again if it was when it was lost)
                obj = _Object(h.size, h.checksum, [node_id], self.pins_to_restore.get(h.key) == h.checksum)
                self._add_object(h.key, obj)
                self._persist_object(h.key, obj)
                self._emit("STORED", h.key, obj.size, [node_id])
                self.counters["adopted_on_register"] += 1
            else:
                drop.append(h.key)  # another version, being rewritten, or removed while the node was away
        self.counters["dropped_on_register"] += len(drop)
        return drop

    def _confirm(self, node: Node) -> None:
        """The node's whole list is in: what it did not name is gone."""
        for key in node.unconfirmed:
            self._drop_replica(key, node.node_id)
        node.unconfirmed = set()

    def heartbeat(
        self,
        now_ms: int,
        node_id: str,
        epoch: int,
        tiers: Sequence[TierCapacity] = (),
        lost: Sequence[bytes] = (),
    ) -> HeartbeatResult:
        """Keep a node alive; returns its pending removal instructions (delivered once).

        An unknown node id or a stale epoch answers ``reregister=True`` and
        changes nothing. ``lost`` keys lose this node's replica. Non-empty
        ``tiers`` replace the node's tier capacities.
        """
        self._advance(now_ms)
        node = self._nodes.get(node_id)
        if node is None or node.epoch != epoch:
            self.counters["reregisters"] += 1
            return HeartbeatResult(True, [])
        node.last_heartbeat_ms = now_ms
        node.deadline_ms = now_ms + self.node_ttl_ms
        if tiers:
            node.tiers = tuple(tiers)
        for key in lost:
            if key in node.keys:
                self._drop_replica(key, node_id)
                self.counters["lost_replicas"] += 1
        remove = list(node.outbox)
        node.outbox.clear()
        return HeartbeatResult(False, remove)

    # -- writes -----------------------------------------------------------------

    def put_start(
        self, now_ms: int, items: Sequence[PutItem], replicas: int = 1, client_host: str = ""
    ) -> PutStartResult:
        """Reserve keys and choose ``replicas`` distinct live nodes for each.

        Per item: INVALID (size 0), ALREADY_EXISTS (complete), BUSY (another
        reservation holds it; of concurrent writers exactly one gets OK),
        NO_SPACE (fewer than ``replicas`` nodes have room even after evicting
        LRU objects that are neither leased nor pinned), else OK with the nodes,
        the first on ``client_host`` when one there has room. The bytes are
        charged to the nodes now and released on revoke, expiry or removal.
        ``replicas`` below 1 means 1; callers cap it at ``max_replicas``.
        """
        self._advance(now_ms)
        replicas = max(1, replicas)
        put_id = self._new_id()
        res = _Reservation(now_ms + self.put_ttl_ms)
        out: list[Placement] = []
        no_room = -1  # smallest size that failed since the last eviction
        named = {it.key for it in items}  # never evicted to make room for this same call
        for it in items:
            key = it.key
            if it.size <= 0:
                out.append(Placement(Status.INVALID))
                continue
            if key in self._objects:
                out.append(Placement(Status.ALREADY_EXISTS))
                continue
            if key in self._pending:
                out.append(Placement(Status.BUSY))
                continue
            chosen = None
            if no_room < 0 or it.size < no_room:
                chosen = choose_nodes(self._nodes.values(), it.size, replicas, client_host)
                if chosen is None:
                    victims = eviction_victims(self._lru, self._objects, self._nodes,
                                               it.size, replicas, named)
                    if victims:
                        for v in victims:
                            self._drop_object(v, self._objects[v], "EVICTED")
                        self.counters["evictions"] += len(victims)
                        no_room = -1
                        chosen = choose_nodes(self._nodes.values(), it.size, replicas,
                                              client_host)
            if chosen is None:
                no_room = it.size if no_room < 0 else min(no_room, it.size)
                self.counters["no_space"] += 1
                out.append(Placement(Status.NO_SPACE))
                continue
            for node in chosen:
                node.assigned_bytes += it.size
                node.outbox.pop(key, None)  # a queued delete must not hit the new bytes
            res.items[key] = _Pending(it.size, None if it.checksum_at_end else it.checksum,
                                      tuple((n.node_id, n.epoch) for n in chosen))
            self._pending[key] = put_id
            self._bump(self._scope_pending, key, 1)
            out.append(Placement(Status.OK, tuple(chosen)))
        if res.items:
            self._reservations[put_id] = res
        self.counters["put_starts"] += 1
        return PutStartResult(put_id, res.expires_ms, out)

    def put_end(self, now_ms: int, put_id: int, keys: Sequence[bytes],
                checksums: Sequence[int] | None = None) -> list[Status]:
        """Make reserved keys visible: OK, or EXPIRED (lapsed, revoked, unknown, or
        every target node died or re-registered since PutStart). Replicas on nodes
        that changed since PutStart are left out of the object.

        ``checksums`` (one per key) completes keys reserved with ``checksum_at_end``;
        INVALID, and the key stays reserved, for such a key without one, or for a
        checksum that differs from the one its PutStart gave."""
        self._advance(now_ms)
        res = self._reservations.get(put_id)
        out: list[Status] = []
        for j, key in enumerate(keys):
            item = res.items.get(key) if res is not None else None
            if item is None:
                out.append(Status.EXPIRED)
                continue
            given = checksums[j] if checksums else None
            if (item.checksum is None and given is None) or \
                    (item.checksum is not None and given is not None and given != item.checksum):
                out.append(Status.INVALID)
                continue
            assert res is not None
            del res.items[key]
            del self._pending[key]
            self._bump(self._scope_pending, key, -1)
            live = [nid for nid, ep in item.targets
                    if (n := self._nodes.get(nid)) is not None and n.epoch == ep]
            for nid, _ in item.targets:
                if nid not in live and nid in self._nodes:
                    self._nodes[nid].outbox[key] = None
            if not live:
                out.append(Status.EXPIRED)
                continue
            checksum = item.checksum if item.checksum is not None else given
            assert checksum is not None  # checked above
            obj = _Object(item.size, checksum, live)
            self._removed.pop(key, None)  # written again: a returning node may hold this version
            self._objects[key] = obj
            self._lru[key] = None
            self._bytes += obj.size
            self._count_scope(key, obj.size)
            for nid in live:
                self._nodes[nid].keys.add(key)  # bytes were charged at PutStart
            self._persist_object(key, obj)
            self._emit("STORED", key, obj.size, live)
            self.counters["puts"] += 1
            out.append(Status.OK)
        if res is not None and not res.items:
            del self._reservations[put_id]
        return out

    def put_revoke(self, now_ms: int, put_id: int, keys: Sequence[bytes]) -> list[Status]:
        """Abandon reserved keys: OK, or EXPIRED when the reservation no longer holds them.

        Target nodes are told to delete whatever bytes arrived.
        """
        self._advance(now_ms)
        res = self._reservations.get(put_id)
        out: list[Status] = []
        for key in keys:
            item = res.items.pop(key, None) if res is not None else None
            if item is None:
                out.append(Status.EXPIRED)
                continue
            self._release(key, item)
            out.append(Status.OK)
        if res is not None and not res.items:
            del self._reservations[put_id]
        return out

    def _release(self, key: bytes, item: _Pending) -> None:
        """Undo a pending reservation item: free its bytes, queue deletes."""
        del self._pending[key]
        self._bump(self._scope_pending, key, -1)
        for nid, ep in item.targets:
            node = self._nodes.get(nid)
            if node is None:
                continue
            if node.epoch == ep:
                node.assigned_bytes -= item.size
            node.outbox[key] = None

    # -- reads ------------------------------------------------------------------

    def lookup(
        self, now_ms: int, keys: Sequence[bytes], lease: bool = False, client_host: str = ""
    ) -> LookupResult:
        """Locations of complete replicas (live nodes only, ``client_host`` first).

        With ``lease`` the found keys are held against eviction and non-forced
        removal until :meth:`release_leases` or ``lease_ttl_ms``. Touches the LRU.
        """
        self._advance(now_ms)
        objects, nodes, lru = self._objects, self._nodes, self._lru
        out: list[Location] = []
        leased: list[_Object] = []
        hits = 0
        for key in keys:
            obj = objects.get(key)
            if obj is None:
                out.append(Location(Status.NOT_FOUND))
                continue
            hits += 1
            lru.move_to_end(key)
            reps = [nodes[r] for r in obj.replicas]
            if client_host and len(reps) > 1:
                reps.sort(key=lambda n: n.host != client_host)
            out.append(Location(Status.OK, obj.size, obj.checksum, tuple(reps)))
            if lease:
                obj.leases += 1
                leased.append(obj)
        self.counters["lookups"] += len(keys)
        self.counters["hits"] += hits
        self.counters["misses"] += len(keys) - hits
        lease_id, expires = 0, 0
        if leased:
            lease_id = self._new_id()
            expires = now_ms + self.lease_ttl_ms
            self._leases[lease_id] = _Lease(expires, leased)
        return LookupResult(lease_id, expires, out)

    def longest_prefix(self, now_ms: int, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` have a complete replica on a live node. O(n)."""
        self._advance(now_ms)
        self.counters["prefix_queries"] += 1
        objects = self._objects
        n = 0
        for key in keys:
            if key not in objects:
                break
            n += 1
        return n

    def release_leases(self, now_ms: int, lease_ids: Iterable[int]) -> int:
        """Release leases early; unknown or expired ids are ignored. Returns how many."""
        self._advance(now_ms)
        n = 0
        for lid in lease_ids:
            lease = self._leases.pop(lid, None)
            if lease is not None:
                n += 1
                for obj in lease.objects:
                    obj.leases -= 1
        return n

    # -- management -------------------------------------------------------------

    def remove(self, now_ms: int, keys: Sequence[bytes], force: bool = False) -> list[Status]:
        """Remove complete objects: NOT_FOUND, PINNED (always), LEASED (unless ``force``), OK.

        The nodes holding a removed key are told on their next heartbeat.
        """
        self._advance(now_ms)
        out: list[Status] = []
        for key in keys:
            obj = self._objects.get(key)
            if obj is None:
                self._tombstone(key)  # a node that is away may still hold it: never adopt it back
                out.append(Status.NOT_FOUND)
            elif obj.pinned:
                out.append(Status.PINNED)
            elif obj.leases and not force:
                out.append(Status.LEASED)
            else:
                self._drop_object(key, obj, "REMOVED")
                self._tombstone(key)
                self.counters["removes"] += 1
                out.append(Status.OK)
        return out

    def report_bad(self, now_ms: int, items: Sequence[tuple[bytes, str, int]]) -> list[Status]:
        """A client failed to verify ``(key, node_id, checksum)``: stop listing that replica
        and tell the node to drop it. OK, or NOT_FOUND when there is no such replica of that
        version (already dropped, or the key now holds another version)."""
        self._advance(now_ms)
        out: list[Status] = []
        for key, nid, checksum in items:
            obj = self._objects.get(key)
            if obj is None or obj.checksum != checksum or nid not in obj.replicas:
                out.append(Status.NOT_FOUND)
                continue
            self._nodes[nid].outbox[key] = None
            self._drop_replica(key, nid)
            self.counters["bad_replicas"] += 1
            out.append(Status.OK)
        return out

    def _tombstone(self, key: bytes) -> None:
        self._removed[key] = None
        self._removed.move_to_end(key)
        if len(self._removed) > _TOMBSTONES:
            self._removed.popitem(last=False)

    def pin(self, now_ms: int, keys: Sequence[bytes]) -> list[Status]:
        """Pin complete objects (never evicted, never removed): OK or NOT_FOUND."""
        return self._set_pin(now_ms, keys, True)

    def unpin(self, now_ms: int, keys: Sequence[bytes]) -> list[Status]:
        """Unpin complete objects: OK (also when not pinned) or NOT_FOUND."""
        return self._set_pin(now_ms, keys, False)

    def pinned_version(self, key: bytes) -> int | None:
        """The checksum of ``key``'s version while it is pinned, else None (what an HA
        master records in etcd so that the next leader pins it again)."""
        obj = self._objects.get(key)
        return obj.checksum if obj is not None and obj.pinned else None

    def _set_pin(self, now_ms: int, keys: Sequence[bytes], pinned: bool) -> list[Status]:
        self._advance(now_ms)
        out: list[Status] = []
        for key in keys:
            obj = self._objects.get(key)
            if obj is None:
                out.append(Status.NOT_FOUND)
                continue
            if obj.pinned != pinned:
                obj.pinned = pinned
                self._pins += 1 if pinned else -1
                self._bump(self._scope_pins, key, 1 if pinned else -1)
                self._persist_object(key, obj)
            out.append(Status.OK)
        return out

    def stats(self, now_ms: int) -> Stats:
        """Totals and counters; ``nodes`` sorted by id. O(nodes)."""
        self._advance(now_ms)
        return Stats(
            nodes=[self._nodes[k] for k in sorted(self._nodes)],
            objects=len(self._objects),
            pending=len(self._pending),
            bytes=self._bytes,
            leases=len(self._leases),
            pins=self._pins,
            counters=dict(self.counters),
        )

    def tick(self, now_ms: int) -> TickResult:
        """Expire nodes, reservations and leases; report what expired since the last tick."""
        self._advance(now_ms)
        out = TickResult(self._dead, self._expired_res, self._expired_leases)
        self._dead, self._expired_res, self._expired_leases = [], 0, 0
        return out

    # -- internals --------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _advance(self, now_ms: int) -> None:
        """Apply every expiry due at ``now_ms``; cheap when nothing is due."""
        last, self._last_now_ms = self._last_now_ms, now_ms
        if self.pause_ms is not None and last is not None and now_ms - last > self.pause_ms:
            # The master was not running: silence since then is not the nodes' fault.
            for n in self._nodes.values():
                n.deadline_ms = max(n.deadline_ms, now_ms + self.node_ttl_ms)
            self._next_node_check = max(self._next_node_check, now_ms + self.node_ttl_ms)
            self.counters["pauses"] += 1
            self.paused_ms = now_ms - last
        if now_ms >= self._next_node_check:
            dead = [n for n in self._nodes.values() if n.deadline_ms <= now_ms]
            for node in dead:
                self._kill_node(node)
            self._next_node_check = min(
                (n.deadline_ms for n in self._nodes.values()), default=now_ms + self.node_ttl_ms)
        res = self._reservations
        while res:
            put_id = next(iter(res))
            r = res[put_id]
            if r.expires_ms > now_ms:
                break
            del res[put_id]
            for key, item in r.items.items():
                self._release(key, item)
            self._expired_res += 1
            self.counters["expired_reservations"] += 1
        leases = self._leases
        while leases:
            lid = next(iter(leases))
            lease = leases[lid]
            if lease.expires_ms > now_ms:
                break
            del leases[lid]
            for obj in lease.objects:
                obj.leases -= 1
            self._expired_leases += 1
            self.counters["expired_leases"] += 1

    def _kill_node(self, node: Node) -> None:
        nid = node.node_id
        del self._nodes[nid]
        for key in node.keys:
            obj = self._objects[key]
            obj.replicas.remove(nid)
            if obj.replicas:
                self._persist_object(key, obj)
                self._emit("REPLICA_LOST", key, obj.size, [nid])
            else:
                self._forget(key, obj, "LOST")
        node.keys = set()
        self._journal.append((codec.NODE + nid.encode(), None))
        self._emit("NODE_LEFT", nodes=[nid])
        self._dead.append(nid)
        self.counters["dead_nodes"] += 1

    def _add_object(self, key: bytes, obj: _Object) -> None:
        self._objects[key] = obj
        self._lru[key] = None
        self._bytes += obj.size
        self._count_scope(key, obj.size)
        self._pins += obj.pinned
        self._bump(self._scope_pins, key, int(obj.pinned))
        for nid in obj.replicas:
            node = self._nodes[nid]
            node.keys.add(key)
            node.assigned_bytes += obj.size

    def _forget(self, key: bytes, obj: _Object, why: str) -> None:
        """Drop the bookkeeping of an object with no replicas left (``why``: its event)."""
        del self._objects[key]
        del self._lru[key]
        self._bytes -= obj.size
        self._count_scope(key, -obj.size)
        self._pins -= obj.pinned
        self._bump(self._scope_pins, key, -int(obj.pinned))
        self._journal.append((codec.OBJECT + key, None))
        self._emit(why, key, obj.size)

    def _drop_replica(self, key: bytes, nid: str) -> None:
        """The node no longer has ``key`` (lost, or not held at re-registration)."""
        obj = self._objects[key]
        obj.replicas.remove(nid)
        node = self._nodes[nid]
        if key in node.keys:
            node.keys.discard(key)
            node.assigned_bytes -= obj.size
        if obj.replicas:
            self._persist_object(key, obj)
            self._emit("REPLICA_LOST", key, obj.size, [nid])
        else:
            self._forget(key, obj, "LOST")

    def _drop_object(self, key: bytes, obj: _Object, why: str) -> None:
        """Remove an object everywhere and tell its nodes to delete it."""
        for nid in obj.replicas:
            node = self._nodes[nid]
            node.keys.discard(key)
            node.assigned_bytes -= obj.size
            node.outbox[key] = None
        obj.replicas = []
        self._forget(key, obj, why)

    def _persist_object(self, key: bytes, obj: _Object) -> None:
        self._journal.append(
            codec.object_record(key, obj.size, obj.checksum, obj.replicas, obj.pinned))
