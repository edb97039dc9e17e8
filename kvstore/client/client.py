"""``kvstore.Client``: the SDK for the pooled store.

The client asks the master where chunks are (or should go) and moves bytes
directly between its own buffers and the nodes' arenas; the master never
touches data. A node on the same host is mapped into this process: reads copy
straight out of its arena (one-sided once the location is known), writes copy
straight into it. Other nodes are reached through their control channel: a
read is one FETCH round trip that returns the bytes, a write one STORE that
carries them (docs/design/hot-path.md). The client only initiates: it starts
no listening server.

Every value is checksummed by the client (XXH3-64 seeded by its key, over 256 KiB
blocks: :mod:`kvstore.checksum`): the node verifies it before making a put
visible, and the client verifies every get (whole values or byte ranges), so
bytes are checked end to end. A chunk that fails verification is a miss.

Keys are immutable once written (as in Mooncake Store): ``put`` of a key that
already exists returns ``False`` and changes nothing; ``remove`` it first to
replace it. Every call takes a deadline (``timeout``, default the client's);
retryable failures (a busy key, a master or node restarting) are retried with
backoff until the deadline or ``retries``. Thread-safe; one client per process
is enough.

``cache_locations`` (on by default; an int sets the number of entries) remembers
where keys were written or found and reads them from that node without asking
the master. On the same host such a read is one-sided: one verified copy out of
the node's mapped arena on the caller's thread, no round trip at all
(:mod:`kvstore.client.samehost`); elsewhere it is one ACQUIRE to the node.
See :mod:`kvstore.client.locations` and docs/design/hot-path.md.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from kvstore._types import byte_view
from kvstore.checksum import block_sums, check_ranges, combine
from kvstore.client.connections import GRPC_OPTIONS, Connections, NodeConn
from kvstore.client.locations import Known, LocationCache
from kvstore.client.releaser import Releaser
from kvstore.errors import (
    Corruption,
    InvalidArgument,
    KVStoreError,
    Timeout,
    TransportError,
    TryAgain,
    status_error,
)
from kvstore.hostid import host_id
from kvstore.keys import check_key
from kvstore.master.errors import error_from_rpc
from kvstore.node.control import FetchRequest, StoreRequest
from kvstore.node.protocol import Acquired, Allocated, Op, SlotStatus
from kvstore.v1 import master_pb2 as mpb
from kvstore.v1 import master_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
Ranges = list[list[tuple[int, int]] | None] | None
"""Per key of a batch: the ``(offset, length)`` ranges to read (``None``: the whole value)."""


class Client:
    """Synchronous client. See the module docstring for the contract."""

    def __init__(
        self,
        master: str = "127.0.0.1:5555",
        *,
        timeout: float = 10.0,
        retries: int = 5,
        replicas: int = 1,
        same_host: bool = True,
        token: str | None = None,
        host: str | None = None,
        cache_locations: bool | int = True,
    ) -> None:
        if timeout <= 0:
            raise InvalidArgument(f"timeout must be > 0, got {timeout}")
        self.master = master
        self.timeout = timeout
        self.retries = retries
        self.replicas = replicas
        self.host_id = host or host_id()
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._channel = grpc.insecure_channel(master, options=GRPC_OPTIONS)
        self._stub = master_pb2_grpc.MasterStub(self._channel)  # type: ignore[no-untyped-call]
        self._conns = Connections(self.host_id, same_host=same_host, timeout=timeout)
        self._releaser = Releaser()
        # Opt-in (content-addressed keys only): see kvstore.client.locations.
        self._locations = None if not cache_locations else LocationCache(
            1 << 18 if cache_locations is True else int(cache_locations))
        self.counters: Counter[str] = Counter()

    # -- plumbing ----------------------------------------------------------------

    def _rpc(self, method: Callable[..., T], request: Any, deadline: float) -> T:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"deadline expired before {getattr(method, '_method', method)!r}")
        try:
            return method(request, timeout=remaining, metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e

    def _retrying(self, op: Callable[[float], T], timeout: float | None) -> T:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        delay = 0.02
        for attempt in range(self.retries + 1):
            try:
                return op(deadline)
            except KVStoreError as e:
                if not e.retryable or attempt == self.retries:
                    raise
                wait = min(delay * (1 + random.random()), deadline - time.monotonic())
                if wait <= 0:
                    raise
                log.debug("retrying after %s (attempt %d)", e, attempt + 1)
                time.sleep(wait)
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    # -- writes ------------------------------------------------------------------------

    def put(self, key: bytes | str, value: Any, *, timeout: float | None = None) -> bool:
        """Store ``value`` (any buffer) under ``key``; ``False`` if the key already exists."""
        return self.put_batch([(key, value)], timeout=timeout)[0]

    def put_from(self, key: bytes | str, buffer: Any, *, timeout: float | None = None) -> bool:
        """Like :meth:`put`, sending straight from a writable ``buffer`` (no staging copy)."""
        return self.put(key, buffer, timeout=timeout)

    def put_batch(self, items: Sequence[tuple[bytes | str, Any]], *,
                  timeout: float | None = None) -> list[bool]:
        """Store every ``(key, value)``; all are validated before anything is sent."""
        keys = [check_key(k) for k, _ in items]
        views = [byte_view(v) for _, v in items]
        for k, v in zip(keys, views, strict=True):
            if len(v) == 0:
                raise InvalidArgument(f"value for key {k[:16]!r} is empty")
        if len(set(keys)) != len(keys):
            raise InvalidArgument("put_batch: duplicate keys in one batch")
        blocks = [block_sums(v, k) for k, v in zip(keys, views, strict=True)]
        sums = [combine(b, k) for k, b in zip(keys, blocks, strict=True)]
        return self._retrying(lambda d: self._put(keys, views, sums, blocks, d), timeout)

    def _put(self, keys: list[bytes], views: list[memoryview], sums: list[int], blocks: list[np.ndarray],
             deadline: float) -> list[bool]:
        req = mpb.PutStartRequest(
            items=[mpb.PutItem(key=k, size=len(v), checksum=c) for k, v, c in zip(keys, views, sums, strict=True)],
            replicas=self.replicas, client_host=self.host_id)
        resp = self._rpc(self._stub.PutStart, req, deadline)
        result = [False] * len(keys)
        todo: dict[str, list[int]] = defaultdict(list)
        nodes: dict[str, mpb.NodeInfo] = {}
        busy = []
        for i, p in enumerate(resp.placements):
            if p.status == mpb.OK:
                for n in p.nodes:
                    todo[n.node_id].append(i)
                    nodes[n.node_id] = n
            elif p.status == mpb.ALREADY_EXISTS:
                self.counters["puts.existing"] += 1
            elif p.status == mpb.BUSY:
                busy.append(i)
            else:
                self._revoke(resp.put_id, keys, todo, deadline)
                name = mpb.ItemStatus.Name(p.status)
                what = f"no node has room for {len(views[i])} bytes" if p.status == mpb.NO_SPACE else "refused"
                raise status_error(name, f"put of key {keys[i][:16]!r}: {what}") or KVStoreError(name)
        failed: set[int] = set()
        placed: dict[int, Known] = {}
        try:
            for node_id, idxs in todo.items():
                failed |= self._write_node(nodes[node_id], idxs, keys, views, sums, blocks, placed, deadline)
        except BaseException:
            self._revoke(resp.put_id, keys, todo, deadline)
            raise
        done = sorted({i for idxs in todo.values() for i in idxs} - failed)
        if self._locations is not None:
            for i, known in placed.items():
                if i not in failed:
                    self._locations.put(keys[i], known)
        if failed:
            self._rpc(self._stub.PutRevoke, mpb.PutRevokeRequest(
                put_id=resp.put_id, keys=[keys[i] for i in sorted(failed)]), deadline)
        if done:
            end = self._rpc(self._stub.PutEnd, mpb.PutEndRequest(
                put_id=resp.put_id, keys=[keys[i] for i in done]), deadline)
            for i, st in zip(done, end.statuses, strict=True):
                if st != mpb.OK:
                    raise TryAgain(f"put of {keys[i][:16]!r} lapsed ({mpb.ItemStatus.Name(st)}); retry")
                result[i] = True
        self.counters["puts"] += len(done)
        if failed:
            raise TransportError(f"{len(failed)} value(s) could not be stored on their node; retry")
        if busy:
            raise TryAgain(f"{len(busy)} key(s) are being written by another client")
        return result

    def _revoke(self, put_id: int, keys: list[bytes], todo: dict[str, list[int]], deadline: float) -> None:
        idxs = sorted({i for v in todo.values() for i in v})
        if not idxs:
            return
        try:
            self._rpc(self._stub.PutRevoke, mpb.PutRevokeRequest(put_id=put_id, keys=[keys[i] for i in idxs]),
                      max(deadline, time.monotonic() + 2))
        except KVStoreError as e:  # the reservation expires on its own
            log.warning("put revoke failed (the master expires it): %s", e)

    def _write_node(self, node: mpb.NodeInfo, idxs: list[int], keys: list[bytes],
                    views: list[memoryview], sums: list[int], blocks: list[np.ndarray],
                    placed: dict[int, Known], deadline: float) -> set[int]:
        """Store ``idxs`` on one node; returns the indices that failed and adds where the
        others landed to ``placed``.

        Same host: ALLOCATE, one copy straight into the mapped arena on this thread,
        COMMIT (the node verifies before the value becomes readable). Otherwise one
        STORE whose request carries the bytes (the node receives them straight into
        its arena, verifies and commits).
        """
        conn = self._conns.get(node)
        if conn.mapped is None:
            try:
                slots = conn.control.store([StoreRequest(keys[i], sums[i], views[i]) for i in idxs],
                                           deadline - time.monotonic())
            except TransportError:
                self._conns.drop(conn)
                raise
            ok = [(i, s) for i, s in zip(idxs, slots, strict=True) if s.status == SlotStatus.OK]
        else:
            arena = conn.mapped.arena
            slots = [Allocated(*s) for s in
                     self._node_call(conn, Op.ALLOCATE, [[keys[i], len(views[i])] for i in idxs], deadline)]
            held = [(i, s) for i, s in zip(idxs, slots, strict=True) if s.status == SlotStatus.OK]
            try:
                for i, s in held:
                    arena[s.offset:s.offset + len(views[i])] = views[i]
            except BaseException:
                self._abort_handles(conn, [s.handle for _, s in held], deadline)
                raise
            statuses = self._node_call(conn, Op.COMMIT, [[s.handle, keys[i], sums[i]] for i, s in held],
                                       deadline) if held else []
            ok = [(i, s) for (i, s), st in zip(held, statuses, strict=True) if st == SlotStatus.OK]
            self.counters["puts.direct"] += len(ok)
        for i, s in zip(idxs, slots, strict=True):
            if s.status not in (SlotStatus.OK, SlotStatus.NO_SPACE):
                log.warning("node %s refused %r: %s", node.node_id, keys[i][:16], SlotStatus(s.status).name)
        for i, s in ok:
            placed[i] = Known(node, len(views[i]), sums[i], s.offset, s.generation, blocks[i])
        return set(idxs) - {i for i, _ in ok}

    def _node_call(self, conn: NodeConn, op: Op, items: list[Any], deadline: float) -> list[Any]:
        try:
            return conn.control.call(op, items, deadline - time.monotonic())
        except TransportError:
            self._conns.drop(conn)
            raise

    def _abort_handles(self, conn: NodeConn, handles: list[int], deadline: float) -> None:
        try:
            conn.control.call(Op.ABORT, handles, max(deadline - time.monotonic(), 2.0))
        except KVStoreError as e:  # the node reclaims them after its hold TTL
            log.warning("abort on node %s failed (reclaimed later): %s", conn.node_id, e)

    # -- reads -------------------------------------------------------------------------

    def get(self, key: bytes | str, *, timeout: float | None = None) -> bytearray | None:
        """A verified copy of the value (a new ``bytearray`` the caller owns), or ``None``
        on a miss (absent, or failed verification on every replica)."""
        return self.get_batch([key], timeout=timeout)[0]

    def get_into(self, key: bytes | str, buffer: Any, *, ranges: Sequence[tuple[int, int]] | None = None,
                 timeout: float | None = None) -> int | None:
        """Read into ``buffer``; returns the bytes written, or ``None`` on a miss.

        ``ranges``: ``(offset, length)`` byte ranges of the value to read instead of
        all of it (a layer of a chunk is one range); they land in ``buffer`` back to
        back, in the order given, each verified against the value's block sums.
        :class:`InvalidArgument` before anything is written if ``buffer`` is
        read-only or too small, or a range is empty or ends past the value.
        """
        return self.get_into_batch([key], [buffer], ranges=None if ranges is None else [ranges],
                                   timeout=timeout)[0]

    def get_batch(self, keys: Sequence[bytes | str], *, timeout: float | None = None) -> list[bytearray | None]:
        ks = [check_key(k) for k in keys]
        return self._retrying(lambda d: self._get(ks, None, None, d), timeout)  # type: ignore[arg-type,return-value]

    def get_into_batch(self, keys: Sequence[bytes | str], buffers: Sequence[Any], *,
                       ranges: Sequence[Sequence[tuple[int, int]] | None] | None = None,
                       timeout: float | None = None) -> list[int | None]:
        """:meth:`get_into` for many keys in one call (a key may repeat, e.g. with other
        ranges). ``ranges``: one entry per key (``None``: the whole value)."""
        if len(keys) != len(buffers):
            raise InvalidArgument(f"{len(keys)} keys but {len(buffers)} buffers")
        if ranges is not None and len(ranges) != len(keys):
            raise InvalidArgument(f"{len(keys)} keys but {len(ranges)} range lists")
        ks = [check_key(k) for k in keys]
        views = [byte_view(b, "buffer") for b in buffers]
        if any(v.readonly for v in views):
            raise InvalidArgument("buffer is read-only")
        rs = None if ranges is None else [None if r is None else check_ranges(r) for r in ranges]
        if rs is not None:
            for v, r in zip(views, rs, strict=True):
                if r is not None and sum(n for _, n in r) > len(v):
                    raise InvalidArgument(f"buffer of {len(v)} bytes is smaller than its ranges "
                                          f"({sum(n for _, n in r)} bytes)")
        res = self._retrying(lambda d: self._get(ks, views, rs, d), timeout)
        return [None if r is None else len(r) for r in res]

    def _get(self, keys: list[bytes], views: list[memoryview] | None, ranges: Ranges,
             deadline: float) -> list[memoryview | bytearray | None]:
        out: list[Any] = [None] * len(keys)
        dests: list[memoryview | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        if self._locations is not None:
            known = {i: loc for i in todo if (loc := self._locations.get(keys[i])) is not None}
            if known:
                self._prepare(known, views, ranges, out, dests)
                got = self._read_one_sided(known, keys, dests, ranges)
                rest = {i: loc for i, loc in known.items() if i not in got}
                if rest:
                    fresh = self._read_replicas({i: [loc.node] for i, loc in rest.items()}, keys, dests, rest,
                                                ranges, deadline)
                    for i, loc in fresh.items():
                        self._locations.put(keys[i], loc)
                    got.update(fresh)
                for i in got:
                    out[i] = dests[i] if views is not None else out[i]
                self._locations.forget([keys[i] for i in known if i not in got])
                todo = [i for i in todo if i not in got]
                self.counters["location_cache.hits"] += len(got)
        if not todo:
            return out
        resp = self._rpc(self._stub.Lookup, mpb.LookupRequest(keys=[keys[i] for i in todo],
                                                              client_host=self.host_id), deadline)
        locs: dict[int, Any] = {}
        pending: dict[int, list[mpb.NodeInfo]] = {}
        for i, location in zip(todo, resp.locations, strict=True):
            out[i] = None
            if location.status != mpb.OK or not location.nodes:
                self.counters["misses.not_found"] += 1
                continue
            locs[i] = location
            pending[i] = list(location.nodes)
        self._prepare(locs, views, ranges, out, dests)
        got = self._read_replicas(pending, keys, dests, locs, ranges, deadline)
        for i in pending:
            if i in got:
                if views is not None:
                    out[i] = dests[i]
                if self._locations is not None:
                    self._locations.put(keys[i], got[i])
            else:
                out[i] = None
                self.counters["misses.unavailable"] += 1
        return out

    @staticmethod
    def _prepare(locs: dict[int, Any], views: list[memoryview] | None, ranges: Ranges, out: list[Any],
                 dests: list[memoryview | None]) -> None:
        """Size checks (before any byte moves) and destination buffers for ``locs``."""
        for i, loc in locs.items():
            rs = ranges[i] if ranges is not None else None
            if rs is not None:
                for off, n in rs:
                    if off + n > loc.size:
                        raise InvalidArgument(f"range ({off}, {n}) ends past the value ({loc.size} bytes)")
            elif views is not None and len(views[i]) < loc.size:
                raise InvalidArgument(
                    f"buffer of {len(views[i])} bytes is smaller than the value ({loc.size} bytes)")
        for i, loc in locs.items():
            rs = ranges[i] if ranges is not None else None
            if views is None:
                if out[i] is None or len(out[i]) != loc.size:
                    out[i] = bytearray(loc.size)
                dests[i] = memoryview(out[i])
            else:
                dests[i] = views[i][: loc.size if rs is None else sum(n for _, n in rs)]

    def _read_one_sided(self, known: dict[int, Known], keys: list[bytes],
                        dests: list[memoryview | None], ranges: Ranges) -> dict[int, Known]:
        """Read what same-host nodes hold at a remembered place, with no round trip.

        Returns the indices read and verified; the rest take the leased path.
        """
        got: dict[int, Known] = {}
        for i, loc in known.items():
            rs = ranges[i] if ranges is not None else None
            if loc.offset < 0 or (rs is not None and loc.sums is None):
                continue
            try:
                conn = self._conns.get(loc.node)
            except TransportError:
                continue
            dst = dests[i]
            if conn.mapped is None or dst is None:
                continue
            st = conn.mapped.read(keys[i], loc, dst, rs)
            if st == SlotStatus.OK:
                got[i] = loc
                self.counters["hits"] += 1
                self.counters["hits.one_sided"] += 1
            elif st == SlotStatus.CORRUPT:
                self.counters["one_sided.corrupt"] += 1
            else:
                self.counters["one_sided.stale"] += 1
        return got

    def _read_replicas(self, pending: dict[int, list[mpb.NodeInfo]], keys: list[bytes],
                       dests: list[memoryview | None], locs: dict[int, Any], ranges: Ranges,
                       deadline: float) -> dict[int, Known]:
        """Read every pending key from its first replica that has it; where each hit was read."""
        got: dict[int, Known] = {}
        while pending:
            by_node: dict[str, list[int]] = defaultdict(list)
            nodes: dict[str, mpb.NodeInfo] = {}
            for i, cands in pending.items():
                by_node[cands[0].node_id].append(i)
                nodes[cands[0].node_id] = cands[0]
            nxt: dict[int, list[mpb.NodeInfo]] = {}
            for node_id, idxs in by_node.items():
                try:
                    ok = self._read_node(nodes[node_id], idxs, keys, dests, locs, ranges, deadline)
                except TransportError as e:
                    log.warning("node %s unreachable: %s", node_id, e)
                    ok = {}
                for i in idxs:
                    if i in ok:
                        got[i] = ok[i]
                        self.counters["hits"] += 1
                    elif len(pending[i]) > 1:
                        nxt[i] = pending[i][1:]
            pending = nxt
        return got

    def _read_node(self, node: mpb.NodeInfo, idxs: list[int], keys: list[bytes], dests: list[memoryview | None],
                   locs: dict[int, Any], ranges: Ranges, deadline: float) -> dict[int, Known]:
        """Read ``idxs`` from one node into ``dests``; the indices read and verified, with
        where they were."""
        conn = self._conns.get(node)
        if conn.mapped is None:
            return self._fetch_node(conn, node, idxs, keys, dests, locs, ranges, deadline)
        # Same host: ACQUIRE holds the values in place, then one verified copy each out of
        # the mapped arena; the node must hold the version the master (or the cache) vouches for.
        slots = [Acquired(*s) for s in self._node_call(conn, Op.ACQUIRE, [keys[i] for i in idxs], deadline)]
        held = [(i, s) for i, s in zip(idxs, slots, strict=True) if s.status == SlotStatus.OK]
        good: dict[int, Known] = {}
        try:
            for i, s in held:
                dst = dests[i]
                loc = Known(node, s.size, s.checksum, s.offset, s.generation, np.frombuffer(s.sums, dtype="<u8"))
                if (dst is not None and s.checksum == locs[i].checksum
                        and conn.mapped.read(keys[i], loc, dst, ranges[i] if ranges is not None else None,
                                             held=True) == SlotStatus.OK):
                    good[i] = loc
                else:
                    self._corrupt(keys[i], node)
        finally:
            self._releaser.release(conn, [s.handle for _, s in held])
        return good

    def _fetch_node(self, conn: NodeConn, node: mpb.NodeInfo, idxs: list[int], keys: list[bytes],
                    dests: list[memoryview | None], locs: dict[int, Any], ranges: Ranges,
                    deadline: float) -> dict[int, Known]:
        """Over the network: one FETCH round trip that names each key and the checksum it
        must have, answered with the bytes (received and verified in one pass)."""
        reqs = [FetchRequest(keys[i], locs[i].checksum, dests[i], ranges[i] if ranges is not None else None)
                for i in idxs]
        try:
            replies = conn.control.fetch(reqs, deadline - time.monotonic())
        except TransportError:
            self._conns.drop(conn)
            raise
        good: dict[int, Known] = {}
        for i, (reply, ok) in zip(idxs, replies, strict=True):
            if reply.status != SlotStatus.OK:
                continue
            if ok:
                good[i] = Known(node, reply.size, reply.checksum, sums=np.frombuffer(reply.sums, dtype="<u8"))
            else:
                self._corrupt(keys[i], node)
        return good

    def _corrupt(self, key: bytes, node: mpb.NodeInfo) -> None:
        self.counters["misses.corrupt"] += 1
        log.warning("%s", Corruption(f"value of {key[:16]!r} from node {node.node_id} "
                                     "failed verification; treated as a miss"))

    # -- metadata ------------------------------------------------------------------------

    def exists(self, key: bytes | str, *, timeout: float | None = None) -> bool:
        return self.exists_batch([key], timeout=timeout)[0]

    def exists_batch(self, keys: Sequence[bytes | str], *, timeout: float | None = None) -> list[bool]:
        ks = [check_key(k) for k in keys]
        resp = self._retrying(lambda d: self._rpc(self._stub.Lookup, mpb.LookupRequest(keys=ks), d), timeout)
        return [loc.status == mpb.OK for loc in resp.locations]

    def longest_prefix(self, keys: Sequence[bytes | str], *, timeout: float | None = None) -> int:
        """How many leading ``keys`` the pool holds (the engine's cache-hit question)."""
        ks = [check_key(k) for k in keys]
        if not ks:
            return 0
        resp = self._retrying(
            lambda d: self._rpc(self._stub.LongestPrefix, mpb.LongestPrefixRequest(keys=ks), d), timeout)
        return int(resp.count)

    def remove(self, key: bytes | str, *, force: bool = False, timeout: float | None = None) -> bool:
        return self.remove_batch([key], force=force, timeout=timeout)[0]

    def remove_batch(self, keys: Sequence[bytes | str], *, force: bool = False,
                     timeout: float | None = None) -> list[bool]:
        """Remove keys; ``True`` per removed key. Leased keys raise TryAgain unless ``force``.

        The nodes that held a removed key are told at once (not at their next
        heartbeat), so no client's cached location serves it afterwards.
        """
        ks = [check_key(k) for k in keys]
        if self._locations is not None:
            self._locations.forget(ks)
        where = self._retrying(lambda d: self._rpc(self._stub.Lookup, mpb.LookupRequest(keys=ks), d), timeout)
        resp = self._retrying(
            lambda d: self._rpc(self._stub.Remove, mpb.RemoveRequest(keys=ks, force=force), d), timeout)
        holders: dict[str, tuple[mpb.NodeInfo, list[bytes]]] = {}
        for k, st, loc in zip(ks, resp.statuses, where.locations, strict=True):
            if st == mpb.OK:
                for n in loc.nodes:
                    holders.setdefault(n.node_id, (n, []))[1].append(k)
        for node, removed in holders.values():
            self._tell_removed(node, removed)
        out = []
        hint = {mpb.LEASED: "leased by a reader; retry or remove(force=True)", mpb.PINNED: "pinned; unpin it first"}
        for k, st in zip(ks, resp.statuses, strict=True):
            if st in hint:
                raise status_error(mpb.ItemStatus.Name(st), f"key {k[:16]!r} is {hint[st]}") or KVStoreError()
            out.append(st == mpb.OK)
        return out

    def _tell_removed(self, node: mpb.NodeInfo, keys: list[bytes]) -> None:
        """Drop removed keys on their node now; if it can't be reached, its next heartbeat does."""
        try:
            conn = self._conns.get(node)
            conn.control.call(Op.REMOVE, keys, self.timeout)
        except KVStoreError as e:
            log.info("node %s not told of %d removal(s) now (its heartbeat will): %s", node.node_id, len(keys), e)

    def stats(self, *, timeout: float | None = None) -> mpb.StatsResponse:
        """The master's view: nodes with tiers, object/lease/pin counts, counters."""
        resp: mpb.StatsResponse = self._retrying(
            lambda d: self._rpc(self._stub.Stats, mpb.StatsRequest(), d), timeout)
        return resp

    def close(self) -> None:
        self._releaser.close()
        self._conns.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
