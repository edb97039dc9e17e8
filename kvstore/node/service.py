"""The node control service: batched control calls translated to LocalStore calls.

See :mod:`kvstore.node.protocol` for the calls and their results. Items are
validated one by one: a malformed item gets ``INVALID`` and the rest of the
batch proceeds; a malformed *request* (wrong types) raises ``ValueError``,
which the server answers with an error and a closed connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from prometheus_client import Histogram

from kvstore.auth import grant_ok
from kvstore.checksum import BLOCK, check_ranges, combine, covering, hasher
from kvstore.errors import Corruption, InvalidArgument, NoSpace
from kvstore.keys import MAX_KEY_BYTES
from kvstore.node.control import Incoming, Streamed
from kvstore.node.holds import Holds, TooManyHolds
from kvstore.node.protocol import Acquired, Allocated, Fetched, Maps, Op, SlotStatus, Stored
from kvstore.store import LocalStore
from kvstore.tiers.dram import Lease

log = logging.getLogger(__name__)

RPC_SECONDS = Histogram(
    "kvstore_node_rpc_seconds", "Node control call latency (server side)", ["method"], registry=None,
    buckets=(2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0),
)
_TIMERS = {op: RPC_SECONDS.labels(op.name.lower()) for op in Op if op != Op.AUTH}


_KEY_AT = {Op.ALLOCATE: 0, Op.COMMIT: 1, Op.FETCH: 0, Op.STORE: 0}  # list items: where the key is


def _check_scope(op: Op, items: list[Any], scope: bytes) -> None:
    """PermissionError unless every key the request names starts with ``scope``."""
    if op in (Op.ABORT, Op.RELEASE):
        return  # handles: bound to the session already
    for item in items:
        at = _KEY_AT.get(op)
        key = item[at] if at is not None and isinstance(item, list) and len(item) > at else item
        if not (isinstance(key, bytes) and key.startswith(scope)):
            raise PermissionError(f"{op.name}: key {key!r:.40} is outside this credential's tenant "
                                  f"(keys must start with {scope!r})")


def _key(v: Any) -> bytes | None:
    return v if isinstance(v, bytes) and 0 < len(v) <= MAX_KEY_BYTES else None


def _uint(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _fetch_item(item: Any) -> tuple[bytes, int, list[tuple[int, int]] | None] | None:
    """``[key, checksum]`` or ``[key, checksum, [[offset, length], ...]]``; None if malformed."""
    if not isinstance(item, list) or len(item) not in (2, 3):
        return None
    key, want = _key(item[0]), _uint(item[1])
    if key is None or want is None:
        return None
    if len(item) == 2:
        return key, want, None
    try:
        return key, want, check_ranges(item[2] if isinstance(item[2], list) else [None])
    except InvalidArgument:
        return None


def _sums(lease: Lease) -> bytes:
    return b"" if lease.sums is None else lease.sums.astype("<u8").tobytes()


def _busy(result: Any) -> bool:
    return bool((result[0] if isinstance(result, tuple) else result) == SlotStatus.BUSY)


class GrantCheck(NamedTuple):
    """Checks write grants signed by the master this node registered with (kvstore.auth)."""

    secret: bytes
    node_id: str

    def ok(self, key: bytes, size: int, checksum: int, grant: Any) -> bool:
        return grant_ok(self.secret, self.node_id, key, size, checksum, grant, int(time.time() * 1000))


class NodeService:
    """``handle(op, items) -> results``. Thread-safe (the store and holds are)."""

    def __init__(self, store: LocalStore, holds: Holds, maps: dict[str, bytes] | None = None, *,
                 require_grants: bool = False, busy_backoff: float = 0.0) -> None:
        self.store = store
        self.holds = holds
        self.busy_backoff = busy_backoff
        """Seconds a request that hit its session's hold cap waits before its BUSY answer
        (on the connection's own thread, holding no lock): a flood of holds from one
        session then costs the node little CPU."""
        self.require_grants = require_grants
        """A secured node stores a value only with a write grant (STORE, COMMIT): refused
        until the master's secret arrived in ``grants`` (see :meth:`may_write`)."""
        self.grants: GrantCheck | None = None
        self.refused_writes = 0
        """STORE/COMMIT items refused for a missing, stale or foreign write grant."""
        # scheme -> RemoteRegion bytes of the generation table, for mappable transports
        self.maps = maps or {}
        self._streaming: dict[Op, Callable[[list[Any], Incoming], list[Any]]]
        # ops on handles take the caller's session: a handle belongs to the session that got it
        self._held: dict[Op, Callable[[list[Any], bytes], list[Any]]] = {
            Op.ALLOCATE: self.allocate,
            Op.COMMIT: self.commit,
            Op.ABORT: self.release,
            Op.ACQUIRE: self.acquire,
            Op.RELEASE: self.release,
        }
        self._ops: dict[Op, Callable[[list[Any]], list[Any] | Streamed]] = {
            Op.MAPS: self.map_info,
            Op.REMOVE: self.remove,
            Op.FETCH: self.fetch,
        }
        self._streaming = {Op.STORE: self.store_stream}

    def handle(self, op: Op, items: list[Any], incoming: Incoming | None = None,
               session: bytes = b"", scope: bytes = b"") -> list[Any] | Streamed:
        """Serve one request of the connection whose session is ``session`` and whose
        credential is confined to keys starting with ``scope`` (b"": any key). ValueError
        for an op this service does not serve, PermissionError for a key outside the scope
        (the server answers and hangs up)."""
        if op not in _TIMERS:
            raise ValueError(f"op {op.name} is not a request")
        if scope:
            if op == Op.MAPS:  # the mapped arena holds every tenant's bytes: control channel only
                return [Maps(SlotStatus.INVALID) for _ in items]
            _check_scope(op, items, scope)
        with _TIMERS[op].time():
            if op in self._streaming:
                if incoming is None:
                    raise ValueError(f"{op.name} needs the bytes that follow its request")
                return self._streaming[op](items, incoming)
            if op in self._held:
                results = self._held[op](items, session)
                if self.busy_backoff and any(_busy(r) for r in results):
                    time.sleep(self.busy_backoff)
                return results
            return self._ops[op](items)

    def may_write(self, key: bytes, size: int, checksum: int, grant: Any) -> bool:
        """Whether this write carries what this node requires: nothing on an open node; on a
        secured one (``require_grants``), a live grant from the master for exactly this
        key, size and checksum on this node (none is accepted before the node registered)."""
        if not self.require_grants:
            return True
        grants = self.grants
        # a grant over checksum 0 is the master's for a put whose checksum comes at PutEnd
        return grants is not None and (grants.ok(key, size, checksum, grant)
                                       or (checksum != 0 and grants.ok(key, size, 0, grant)))

    def store_stream(self, items: list[Any], incoming: Incoming) -> list[Any]:
        """STORE: receive each value straight into arena space, hashing blocks as they land,
        and commit it if it verifies (a nil checksum: commit it with the checksum of what
        landed, which the reply carries for the writer to compare with its own). A
        malformed item fails the whole request (the bytes that follow can no longer be
        framed): ValueError, and the server hangs up."""
        parsed = []
        for item in items:
            key, size, want = (_key(item[0]), _uint(item[1]), _uint(item[2]) if item[2] is not None else -1) \
                if isinstance(item, list) and len(item) in (3, 4) else (None, None, None)
            if key is None or not size or want is None or size > self.store.arena.capacity:
                raise ValueError(f"STORE item must be [key, 0 < size <= arena, checksum or nil(, grant)], "
                                 f"got {item!r:.80}")
            parsed.append((key, size, want, item[3] if len(item) == 4 else None))
        out: list[Any] = []
        for key, size, want, grant in parsed:
            if not self.may_write(key, size, max(want, 0), grant):
                incoming.drain(size)
                self.refused_writes += 1
                out.append(Stored(SlotStatus.DENIED))
                continue
            try:
                alloc = self.store.reserve(size)
            except (NoSpace, InvalidArgument):
                incoming.drain(size)
                out.append(Stored(SlotStatus.NO_SPACE))
                continue
            try:
                h = hasher(key)
                view = alloc.view()
                for off in range(0, size, BLOCK):
                    block = view[off:off + BLOCK]
                    incoming.recv_into(block)
                    h.update(block)
            except BaseException:  # the client went away mid-value
                alloc.release()
                raise
            sums = h.sums()
            landed = combine(sums, key)
            if want >= 0 and landed != want:
                alloc.release()
                log.warning("store of %r refused: bytes do not match their checksum", key[:16])
                out.append(Stored(SlotStatus.CORRUPT))
                continue
            offset, generation = alloc.offset, self.store.arena.generation(alloc.offset)
            self.store.commit(key, alloc, landed, sums=sums)  # takes over the reference
            out.append(Stored(SlotStatus.OK, 0, offset, generation, landed))
        return out

    def allocate(self, items: list[Any], session: bytes = b"") -> list[Any]:
        out: list[Any] = []
        for item in items:
            key, size = (_key(item[0]), _uint(item[1])) if isinstance(item, list) and len(item) == 2 \
                else (None, None)
            if key is None or not size:
                out.append(Allocated(SlotStatus.INVALID))
                continue
            try:
                alloc = self.store.reserve(size)
            except NoSpace:
                out.append(Allocated(SlotStatus.NO_SPACE))
                continue
            except InvalidArgument:
                out.append(Allocated(SlotStatus.INVALID))
                continue
            try:
                handle = self.holds.add(alloc, key, session)
            except TooManyHolds:
                alloc.release()
                out.append(Allocated(SlotStatus.BUSY))
                continue
            out.append(Allocated(SlotStatus.OK, handle, alloc.offset, self.store.arena.generation(alloc.offset)))
        return out

    def commit(self, items: list[Any], session: bytes = b"") -> list[Any]:
        out: list[Any] = []
        for item in items:
            if not (isinstance(item, list) and len(item) in (3, 4)):
                out.append(SlotStatus.INVALID)
                continue
            handle, key, checksum = _uint(item[0]), _key(item[1]), _uint(item[2])
            hold = self.holds.take(handle, session) if handle is not None else None
            if hold is None or key is None or checksum is None or hold.key != key:
                if hold is not None:
                    hold.obj.release()
                out.append(SlotStatus.EXPIRED)
                continue
            size = getattr(hold.obj, "size", 0)
            if not self.may_write(key, size, checksum, item[3] if len(item) == 4 else None):
                hold.obj.release()
                self.refused_writes += 1
                out.append(SlotStatus.DENIED)
                continue
            try:
                self.store.commit(key, hold.obj, checksum)  # type: ignore[arg-type]
                out.append(SlotStatus.OK)
            except Corruption as e:
                log.warning("commit refused: %s", e)
                out.append(SlotStatus.CORRUPT)
        return out

    def acquire(self, items: list[Any], session: bytes = b"") -> list[Any]:
        out: list[Any] = []
        for item in items:
            key = _key(item)
            if key is None:
                out.append(Acquired(SlotStatus.INVALID))
                continue
            lease = self.store.acquire(key)
            if lease is None:
                out.append(Acquired(SlotStatus.NOT_FOUND))
                continue
            try:
                h = self.holds.add(lease, key, session)
            except TooManyHolds:
                lease.release()
                out.append(Acquired(SlotStatus.BUSY))
                continue
            out.append(Acquired(SlotStatus.OK, h, lease.alloc.offset, lease.alloc.size, lease.checksum,
                                lease.generation, _sums(lease)))
        return out

    def fetch(self, items: list[Any]) -> Streamed:
        """Hold each value whose checksum is the one the client expects, and stream it (or
        the blocks its ranges touch) after the reply; the holds go once it is sent."""
        out: list[Any] = []
        tail: list[memoryview] = []
        leases: list[Lease] = []
        for item in items:
            parsed = _fetch_item(item)
            if parsed is None:
                out.append(Fetched(SlotStatus.INVALID))
                continue
            key, want, ranges = parsed
            lease = self.store.acquire(key)
            if lease is None:
                out.append(Fetched(SlotStatus.NOT_FOUND))
                continue
            size = lease.alloc.size
            if lease.checksum != want or any(off + n > size for off, n in ranges or ()):
                # another version than the client was told of (a range past its end, too)
                lease.release()
                out.append(Fetched(SlotStatus.EXPIRED))
                continue
            leases.append(lease)
            view = lease.view
            if ranges is None:
                tail.append(view)
            else:
                for off, n in ranges:
                    blocks = covering(off, n)
                    tail.append(view[blocks.start * BLOCK : min(blocks.stop * BLOCK, size)])
            out.append(Fetched(SlotStatus.OK, size, lease.checksum, _sums(lease)))

        def done() -> None:
            for lease in leases:
                lease.release()

        return Streamed(out, tail, done)

    def map_info(self, items: list[Any]) -> list[Any]:
        granule = self.store.arena.alignment
        return [Maps(SlotStatus.OK, table, granule) if isinstance(i, str) and (table := self.maps.get(i))
                else Maps(SlotStatus.INVALID) for i in items]

    def remove(self, items: list[Any]) -> list[Any]:
        """Drop keys the master already removed (sent by the client that removed them,
        so one-sided readers stop at once instead of at the next heartbeat)."""
        return [SlotStatus.INVALID if (k := _key(i)) is None
                else SlotStatus.OK if self.store.remove(k) else SlotStatus.NOT_FOUND for i in items]

    def release(self, items: list[Any], session: bytes = b"") -> list[Any]:
        return [SlotStatus.OK if (h := _uint(i)) is not None and self.holds.release(h, session)
                else SlotStatus.EXPIRED for i in items]
