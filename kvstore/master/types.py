"""Plain values the master's state takes and returns (no protobuf, no I/O).

The servicer (:mod:`kvstore.master.server`) maps these to and from the
``kvstore.v1`` messages field by field; :class:`Status` numbers equal the
protobuf ``ItemStatus`` numbers so they pass through unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Status(enum.IntEnum):
    """Per-item outcome; the same numbers as ``kvstore.v1.ItemStatus``."""

    OK = 1
    NOT_FOUND = 2  # no complete replica of the key
    ALREADY_EXISTS = 3  # PutStart: the key is complete already
    BUSY = 4  # PutStart: another reservation holds the key
    NO_SPACE = 5  # PutStart: no node has room, even after evicting
    LEASED = 6  # Remove: a read lease holds the key
    PINNED = 7  # Remove: the key is pinned
    EXPIRED = 8  # PutEnd/PutRevoke: the reservation lapsed or was revoked
    INVALID = 9  # the item is malformed (size 0)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A node's transport endpoint: URI scheme, opaque connect metadata, region descriptor."""

    scheme: str
    metadata: bytes = b""
    region: bytes = b""


@dataclass(frozen=True, slots=True)
class TierCapacity:
    """One storage tier of a node, in bytes."""

    name: str
    capacity: int
    used: int = 0


@dataclass(frozen=True, slots=True)
class HeldKey:
    """A key a registering node already stores."""

    key: bytes
    size: int
    checksum: int


@dataclass(frozen=True, slots=True)
class PutItem:
    """One key to reserve: its size and XXH3 checksum (seeded by the key), or, with
    ``checksum_at_end``, no checksum yet: it comes with PutEnd."""

    key: bytes
    size: int
    checksum: int
    checksum_at_end: bool = False


@dataclass(eq=False, slots=True)
class Node:
    """A live node as the master knows it.

    Results hand out the state's own records: treat them as read-only snapshots,
    valid until the next call into the state (convert them right away).
    """

    node_id: str
    epoch: int
    host: str
    control_address: str
    endpoints: tuple[Endpoint, ...]
    tiers: tuple[TierCapacity, ...]
    last_heartbeat_ms: int
    deadline_ms: int
    assigned_bytes: int = 0
    keys: set[bytes] = field(default_factory=set)  # complete replicas placed here
    outbox: dict[bytes, None] = field(default_factory=dict)  # removal instructions
    unconfirmed: set[bytes] = field(default_factory=set)  # listed before a paged registration, not yet re-held

    @property
    def capacity(self) -> int:
        """Sum of the capacities of every tier."""
        return sum(t.capacity for t in self.tiers)

    @property
    def free(self) -> int:
        """Capacity minus the bytes the master has assigned (may be negative after a shrink)."""
        return self.capacity - self.assigned_bytes

    @property
    def objects(self) -> int:
        """Complete replicas the master places on this node."""
        return len(self.keys)


@dataclass(frozen=True, slots=True)
class RegisterResult:
    epoch: int
    heartbeat_interval_ms: int
    node_ttl_ms: int
    drop: list[bytes]  # held keys the node must delete


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    reregister: bool  # unknown node or stale epoch: call register_node again
    remove: list[bytes]  # keys the node must delete (eviction, Remove, revoked puts)


@dataclass(frozen=True, slots=True)
class Placement:
    status: Status
    nodes: tuple[Node, ...] = ()  # one per replica, first preferred, when status is OK


@dataclass(frozen=True, slots=True)
class PutStartResult:
    put_id: int
    expires_ms: int
    placements: list[Placement]


@dataclass(frozen=True, slots=True)
class Location:
    status: Status
    size: int = 0
    checksum: int = 0
    nodes: tuple[Node, ...] = ()  # complete replicas, the client's host first


@dataclass(frozen=True, slots=True)
class LookupResult:
    lease_id: int  # 0 when no lease was taken
    lease_expires_ms: int
    locations: list[Location]


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a chunk or a node (kind: a ``PoolEvent.Kind`` name)."""

    kind: str
    key: bytes = b""
    size: int = 0
    nodes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TickResult:
    """What expired since the previous tick (deaths found by any call are reported here)."""

    dead_nodes: list[str]
    expired_reservations: int
    expired_leases: int


@dataclass(frozen=True, slots=True)
class Stats:
    nodes: list[Node]
    objects: int
    pending: int
    bytes: int
    leases: int
    pins: int
    counters: dict[str, int]
