"""The pool client's logic, without I/O: every call is a generator of effects.

:class:`ClientCore` holds what a client knows (its location cache, counters,
options) and writes each operation once, as a generator that yields the I/O it
needs (:class:`Master`, :class:`NodeCall`, :class:`Fetch`, :class:`Store`,
:class:`Connect`, :class:`Release`) and receives the results, or has the
failure thrown in. :class:`~kvstore.client.Client` runs these flows with
blocking calls, :class:`~kvstore.client.AsyncClient` with awaits; the same-host
copies (CPU work on mapped memory) run inside the flows. The protocol and its
consistency rules: docs/design/hot-path.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple, TypeVar

import numpy as np

from kvstore._types import byte_view
from kvstore.checksum import block_sums, check_ranges, combine, gather_summed, hasher
from kvstore.client.device import Copier, DeviceBuffer, cuda_copier, device_buffer
from kvstore.client.locations import Known, LocationCache
from kvstore.client.samehost import MappedNode
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
from kvstore.master.discovery import is_etcd
from kvstore.node.control import FetchRequest, StoreRequest
from kvstore.node.protocol import Acquired, Allocated, Op, SlotStatus
from kvstore.scatter import Dest, Scattered, Source, host
from kvstore.tls import ClientTLS
from kvstore.v1 import master_pb2 as mpb

log = logging.getLogger(__name__)
T = TypeVar("T")
Ranges = list[list[tuple[int, int]] | None] | None
"""Per key of a batch: the ``(offset, length)`` ranges to read (``None``: the whole value)."""


class Master(NamedTuple):
    """Call the master's ``method`` (a Master RPC name) -> its response.

    ``post``: where the framed channel is up, send the call without waiting for its
    reply -> None, and hand the reply (response or KVStoreError) to ``post`` when it is
    read (where it is not, the call is made as usual -> its response). ``ordered``:
    first read every reply still owed to this client's posted calls, so that the call
    sees what they did (every call but a ``PutStart`` of other keys)."""

    method: str
    request: Any
    deadline: float
    post: Callable[[Any], None] | None = None
    ordered: bool = True


class Connect(NamedTuple):
    """The connection to ``node`` (opened, and its memory mapped if on this host, once)."""

    node: mpb.NodeInfo


class NodeCall(NamedTuple):
    """A control call on a node -> its per-item results."""

    conn: Any
    op: Op
    items: list[Any]
    deadline: float


class Fetch(NamedTuple):
    """FETCH from a node -> ``[(Fetched, landed_and_verified)]``."""

    conn: Any
    requests: list[FetchRequest]
    deadline: float


class Store(NamedTuple):
    """STORE on a node -> ``[Stored]``."""

    conn: Any
    requests: list[StoreRequest]
    deadline: float


class Release(NamedTuple):
    """Hand read holds back to a node, off the caller's path (never fails) -> None."""

    conn: Any
    handles: list[int]


Effect = Master | Connect | NodeCall | Fetch | Store | Release
FAST_RETRY = 5.0
POST_WITHIN = 1.0
"""A put whose PutStart is older than this seconds awaits its PutEnd's answer instead of
posting it (a reservation lapses after ``master.put_ttl``, 30 s by default, at least 2 s)."""
MASTER_ATTEMPT = 2.0
"""With a followed master (etcd://), one try of a master call gives up after this long
(then asks etcd for the leader and retries), so a paused or dead leader costs one try,
not the whole deadline."""
"""Seconds before a client asks the master again for its framed channel after it failed."""
Flow = Generator[Effect, Any, T]


class ClientCore:
    """State and flows shared by the blocking and the asyncio client."""

    def __init__(self, master: str = "127.0.0.1:5555", *, timeout: float = 10.0, retries: int = 5,
                 replicas: int = 1, same_host: bool = True, token: str | None = None, host: str | None = None,
                 cache_locations: bool | int = True, tls_ca: str | None = None, tls_cert: str | None = None,
                 tls_key: str | None = None) -> None:
        if timeout <= 0:
            raise InvalidArgument(f"timeout must be > 0, got {timeout}")
        self.master = master
        self._followed = is_etcd(master)
        self.timeout = timeout
        self.retries = retries
        self.replicas = replicas
        self.same_host = same_host
        self.host_id = host or host_id()
        self.token = token
        # TLS to the master (gRPC and framed channel) and to the nodes' control channels,
        # verified against this CA (kvstore auth init --tls), presenting tls_cert where
        # the master or node asks for a client certificate (mutual TLS)
        self.tls = ClientTLS.of(tls_ca, tls_cert, tls_key)
        self._tls = self.tls.context() if self.tls is not None else None
        self._key_prefix: bytes | None = None  # the credential's key scope, once known
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._auth = f"Bearer {token}".encode() if token else None
        # The master's framed channel (kvstore.master.fast), learned from Hello; re-asked
        # at most every FAST_RETRY seconds after it failed; off for good on an old master.
        self._fast: Any = None
        self._fast_retry_at = 0.0
        self._bad: list[mpb.BadReplica] = []  # replicas that failed verification, to report
        self._bad_lock = threading.Lock()
        self._locations = None if not cache_locations else LocationCache(
            1 << 18 if cache_locations is True else int(cache_locations))
        self.counters: Counter[str] = Counter()
        # keys whose PutEnd was posted and not yet answered, and the first put that
        # returned but whose PutEnd failed (raised by the next flush())
        self._posting: set[bytes] = set()
        self._lost: KVStoreError | None = None
        # Moves bytes to and from CUDA buffers (kvstore.client.device); made when the first
        # one is given (tests on machines without a GPU set a stand-in).
        self.copier: Copier | None = None

    def _copier(self) -> Copier:
        with self._bad_lock:
            if self.copier is None:
                self.copier = cuda_copier()
            return self.copier

    def _staged(self, views: list[Source], idxs: list[int]) -> dict[int, memoryview]:
        """The CUDA values among ``views[idxs]``, copied into pinned host buffers (a write
        to a node that is not mapped here)."""
        dev = [i for i in idxs if isinstance(views[i], DeviceBuffer)]
        if not dev:
            return {}
        copier = self._copier()
        out = {}
        for i in dev:
            v = views[i]
            assert isinstance(v, DeviceBuffer)
            out[i] = copier.staging(len(v))
            copier.to_host(out[i], v)
        copier.wait()
        return out

    @property
    def _max_delay(self) -> float:
        """Longest back-off between tries (short when following a cluster's leader)."""
        return 0.25 if self._followed else 1.0

    def _give_up(self, e: KVStoreError, attempt: int) -> bool:
        """After a failed try: raise ``e`` now? Retryable errors are retried ``retries``
        times; with a followed master (etcd://), an unreachable or not-yet-serving master
        is retried until the deadline instead (a failover takes a lease TTL)."""
        if not e.retryable:
            return True
        if self._followed and isinstance(e, (TransportError, Timeout)):
            return False
        return attempt >= self.retries

    def _attempt(self, e: Master) -> float:
        """Seconds this try of master call ``e`` may take (Timeout if its deadline passed)."""
        remaining = e.deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"deadline expired before {e.method}")
        return min(remaining, MASTER_ATTEMPT) if self._followed else remaining

    # -- arguments (checked before anything is sent) ----------------------------------

    @staticmethod
    def _put_args(items: Sequence[tuple[bytes | str, Any]]) -> tuple[list[bytes], list[Source]]:
        keys = [check_key(k) for k, _ in items]
        views: list[Source] = [v if isinstance(v, Scattered) else device_buffer(v, "value") or byte_view(v)
                               for _, v in items]
        for k, v in zip(keys, views, strict=True):
            if len(v) == 0:
                raise InvalidArgument(f"value for key {k[:16]!r} is empty")
        if len(set(keys)) != len(keys):
            raise InvalidArgument("put_batch: duplicate keys in one batch")
        return keys, views

    @staticmethod
    def _get_into_args(keys: Sequence[bytes | str], buffers: Sequence[Any],
                       ranges: Sequence[Sequence[tuple[int, int]] | None] | None
                       ) -> tuple[list[bytes], list[Dest], Ranges]:
        if len(keys) != len(buffers):
            raise InvalidArgument(f"{len(keys)} keys but {len(buffers)} buffers")
        if ranges is not None and len(ranges) != len(keys):
            raise InvalidArgument(f"{len(keys)} keys but {len(ranges)} range lists")
        ks = [check_key(k) for k in keys]
        views: list[Dest] = [b if isinstance(b, Scattered) else device_buffer(b) or byte_view(b, "buffer")
                             for b in buffers]
        if any(v.readonly for v in views):
            raise InvalidArgument("buffer is read-only")
        rs = None if ranges is None else [None if r is None else check_ranges(r) for r in ranges]
        for v, r in zip(views, rs or [], strict=False):
            if r is not None and sum(n for _, n in r) > len(v):
                raise InvalidArgument(f"buffer of {len(v)} bytes is smaller than its ranges "
                                      f"({sum(n for _, n in r)} bytes)")
        return ks, views, rs

    # -- writes ------------------------------------------------------------------------

    def _put_flow(self, keys: list[bytes], views: list[Source], deadline: float) -> Flow[list[bool]]:
        keys = yield from self._scoped(keys, deadline)
        # The checksums go with PutEnd: each value is hashed as it is copied or sent,
        # not in a pass of its own before PutStart (docs/design/hot-path.md, "Writes").
        blocks: list[np.ndarray | None] = [None] * len(keys)
        sums = [0] * len(keys)
        req = mpb.PutStartRequest(
            items=[mpb.PutItem(key=k, size=len(v), checksum_at_end=True) for k, v in zip(keys, views, strict=True)],
            replicas=self.replicas, client_host=self.host_id)
        started = time.monotonic()
        with self._bad_lock:
            ordered = not self._posting.isdisjoint(keys)  # a key whose PutEnd is still owed an answer
        resp = yield Master("PutStart", req, deadline, ordered=ordered)
        result = [False] * len(keys)
        todo: dict[str, list[int]] = defaultdict(list)
        nodes: dict[str, mpb.NodeInfo] = {}
        busy = []
        refused = None
        grants: dict[tuple[int, str], bytes] = {}  # (item, node) -> its write grant (secured masters)
        for i, p in enumerate(resp.placements):
            if p.status == mpb.OK:
                for j, n in enumerate(p.nodes):
                    todo[n.node_id].append(i)
                    nodes[n.node_id] = n
                    if j < len(p.grants):
                        grants[i, n.node_id] = p.grants[j]
            elif p.status == mpb.ALREADY_EXISTS:
                self.counters["puts.existing"] += 1
            elif p.status == mpb.BUSY:
                busy.append(i)
            elif refused is None:
                refused = i
        if refused is not None:  # every reservation of the call is given back, not just the earlier ones
            yield from self._revoke_flow(resp.put_id, keys, todo, deadline)
            st = resp.placements[refused].status
            name = mpb.ItemStatus.Name(st)
            what = f"no node has room for {len(views[refused])} bytes" if st == mpb.NO_SPACE else "refused"
            raise status_error(name, f"put of key {keys[refused][:16]!r}: {what}") or KVStoreError(name)
        failed: set[int] = set()
        placed: dict[int, Known] = {}
        try:
            for node_id, idxs in todo.items():
                failed |= yield from self._write_node_flow(nodes[node_id], idxs, keys, views, sums, blocks, placed,
                                                           deadline, [grants.get((i, node_id)) for i in idxs])
        except BaseException:
            yield from self._revoke_flow(resp.put_id, keys, todo, deadline)
            raise
        done = sorted({i for idxs in todo.values() for i in idxs} - failed)
        if self._locations is not None:
            for i, known in placed.items():
                if i not in failed:
                    self._locations.put(keys[i], known)
        if failed:
            yield Master("PutRevoke", mpb.PutRevokeRequest(put_id=resp.put_id, keys=[keys[i] for i in sorted(failed)]),
                         deadline)
        if done:
            # One master round trip on the put's path: the PutEnd is posted, not awaited
            # (docs/design/hot-path.md, "Writes"), unless the put took so long that its
            # reservation may be near lapsing.
            ended = [keys[i] for i in done]
            post = self._ended(ended) if time.monotonic() - started < POST_WITHIN else None
            if post is not None:
                with self._bad_lock:
                    self._posting.update(ended)
            posted = False
            try:
                end = yield Master("PutEnd", mpb.PutEndRequest(put_id=resp.put_id, keys=ended,
                                                               checksums=[sums[i] for i in done]), deadline, post)
                posted = end is None
            finally:
                if post is not None and not posted:  # answered already (gRPC), or failed: owed nothing
                    with self._bad_lock:
                        self._posting.difference_update(ended)
            if posted:
                self.counters["puts.end_posted"] += len(ended)
            else:
                for i, st in zip(done, end.statuses, strict=True):
                    if st != mpb.OK:
                        raise TryAgain(f"put of {keys[i][:16]!r} lapsed ({mpb.ItemStatus.Name(st)}); retry")
            for i in done:
                result[i] = True
        self.counters["puts"] += len(done)
        if failed:
            raise TransportError(f"{len(failed)} value(s) could not be stored on their node; retry")
        if busy:
            raise TryAgain(f"{len(busy)} key(s) are being written by another client")
        return result

    def _ended(self, keys: list[bytes]) -> Callable[[Any], None]:
        """What to do with the reply to a posted PutEnd of ``keys``: a key it did not make
        visible is a put that returned but was lost; it is logged, counted
        (``puts.lost``), forgotten by the location cache and raised by :meth:`flush`."""

        def done(reply: Any) -> None:
            if isinstance(reply, KVStoreError):
                lost, why = keys, str(reply)
            else:
                lost = [k for k, st in zip(keys, reply.statuses, strict=True) if st != mpb.OK]
                why = ", ".join(sorted({mpb.ItemStatus.Name(st) for st in reply.statuses if st != mpb.OK}))
            with self._bad_lock:
                self._posting.difference_update(keys)
                if lost and self._lost is None:  # the first since the last flush() (all are counted)
                    self._lost = TryAgain(f"{len(lost)} put(s) returned but did not become visible "
                                          f"(first {lost[0][:16]!r}): {why}; put them again "
                                          f"(counters['puts.lost'] counts them all)")
            if lost:
                self.counters["puts.lost"] += len(lost)
                if self._locations is not None:
                    self._locations.forget(lost)
                log.warning("%d put(s) returned but their PutEnd failed (%s): not visible", len(lost), why)

        return done

    def _raise_lost(self) -> None:
        """Raise (once) the first failure of a posted PutEnd since the last call."""
        with self._bad_lock:
            lost, self._lost = self._lost, None
        if lost is not None:
            raise lost

    def _revoke_flow(self, put_id: int, keys: list[bytes], todo: dict[str, list[int]], deadline: float) -> Flow[None]:
        idxs = sorted({i for v in todo.values() for i in v})
        if not idxs:
            return
        try:
            yield Master("PutRevoke", mpb.PutRevokeRequest(put_id=put_id, keys=[keys[i] for i in idxs]),
                         max(deadline, time.monotonic() + 2))
        except KVStoreError as e:  # the reservation expires on its own
            log.warning("put revoke failed (the master expires it): %s", e)

    def _write_node_flow(self, node: mpb.NodeInfo, idxs: list[int], keys: list[bytes], views: list[Source],
                         sums: list[int], blocks: list[np.ndarray | None], placed: dict[int, Known],
                         deadline: float, grants: list[bytes | None]) -> Flow[set[int]]:
        """Store ``idxs`` on one node; the indices that failed (where the others landed
        goes into ``placed``). Fills in ``sums``/``blocks`` of the values stored, from the
        bytes as they were copied or sent (a replica whose bytes hash otherwise fails).

        Same host: ALLOCATE, one copy straight into the mapped arena hashing as it
        copies, COMMIT with the checksum (the node verifies before the value becomes
        readable). Otherwise one STORE whose request carries the bytes, hashed block by
        block right after each is sent; the node receives them into its arena, hashes
        them as they land, commits, and answers the checksum of what landed, which must
        be the writer's.
        """
        conn = yield Connect(node)
        if conn.mapped is None:
            summers = [hasher(keys[i]) for i in idxs]
            staged = self._staged(views, idxs)  # CUDA values go out of pinned host memory
            slots = yield Store(conn, [StoreRequest(keys[i], None, staged[i] if i in staged else host(views[i]), g, h)
                                       for i, g, h in zip(idxs, grants, summers, strict=True)], deadline)
            ok = []
            for i, s, h in zip(idxs, slots, summers, strict=True):
                if s.status != SlotStatus.OK:
                    continue
                b = h.sums()
                if not self._hashed(i, keys[i], b, s.checksum, sums, blocks, node.node_id):
                    continue
                ok.append((i, s))
        else:
            arena = conn.mapped.arena
            slots = [Allocated(*s) for s in (yield NodeCall(conn, Op.ALLOCATE,
                                                            [[keys[i], len(views[i])] for i in idxs], deadline))]
            held = [(i, s) for i, s in zip(idxs, slots, strict=True) if s.status == SlotStatus.OK]
            try:
                for i, s in held:
                    conn.mapped.touch(s.offset, len(views[i]), write=True)
                # every value of the batch (a Scattered one piece by piece, never gathered
                # first) in one native pass over both copy threads, hashed as it lands;
                # CUDA values DMA'd straight into their extents, then hashed there
                on_host = [(i, s) for i, s in held if not isinstance(views[i], DeviceBuffer)]
                landed = dict(zip([i for i, _ in on_host], gather_summed(
                    [(arena[s.offset:s.offset + len(views[i])], host(views[i]), keys[i]) for i, s in on_host]),
                    strict=True))
                landed.update(self._from_device(conn.mapped, [(i, s) for i, s in held if i not in landed],
                                                keys, views))
                for i, _ in held:
                    if not self._hashed(i, keys[i], landed[i], None, sums, blocks, node.node_id):
                        raise Corruption(f"put of {keys[i][:16]!r}: the value changed while it was written")
            except BaseException:
                try:
                    yield NodeCall(conn, Op.ABORT, [s.handle for _, s in held], max(deadline, time.monotonic() + 2))
                except KVStoreError as e:  # the node reclaims them after its hold TTL
                    log.warning("abort on node %s failed (reclaimed later): %s", node.node_id, e)
                raise
            grant_of = dict(zip(idxs, grants, strict=True))
            statuses = (yield NodeCall(conn, Op.COMMIT, [[s.handle, keys[i], sums[i]] if grant_of[i] is None
                                                         else [s.handle, keys[i], sums[i], grant_of[i]]
                                                         for i, s in held], deadline)
                        ) if held else []
            ok = [(i, s) for (i, s), st in zip(held, statuses, strict=True) if st == SlotStatus.OK]
            self.counters["puts.direct"] += len(ok)
        for i, s in zip(idxs, slots, strict=True):
            if s.status not in (SlotStatus.OK, SlotStatus.NO_SPACE):
                log.warning("node %s refused %r: %s", node.node_id, keys[i][:16], SlotStatus(s.status).name)
        for i, s in ok:
            hashed = blocks[i]
            assert hashed is not None
            placed[i] = Known(node, len(views[i]), sums[i], s.offset, s.generation, hashed)
        return set(idxs) - {i for i, _ in ok}

    def _copier_for(self, reads: Sequence[tuple[Any, Any, Any, Any]]) -> Copier | None:
        """The copier when a read of ``reads`` lands in CUDA memory."""
        return self._copier() if any(isinstance(r[2], DeviceBuffer) for r in reads) else None

    def _from_device(self, mapped: MappedNode, held: list[tuple[int, Allocated]], keys: list[bytes],
                     views: list[Source]) -> dict[int, np.ndarray]:
        """DMA each CUDA value of ``held`` into its allocated extent of ``mapped``'s arena
        (page-locked once), then hash it there: its block sums, by index."""
        if not held:
            return {}
        copier = self._copier()
        mapped.register(copier)
        for i, s in held:
            v = views[i]
            assert isinstance(v, DeviceBuffer)
            copier.to_host(mapped.arena[s.offset:s.offset + len(v)], v)
        copier.wait()
        return {i: block_sums(mapped.arena[s.offset:s.offset + len(views[i])], keys[i]) for i, s in held}

    @staticmethod
    def _hashed(i: int, key: bytes, b: np.ndarray, landed: int | None, sums: list[int],
                blocks: list[np.ndarray | None], node_id: str) -> bool:
        """Record value ``i``'s block sums ``b`` as the writer hashed them; False (logged)
        when the node's checksum of what landed (``landed``), or another replica's
        hashing of the same value, disagrees."""
        c = combine(b, key)
        if (landed is not None and landed != c) or (blocks[i] is not None and sums[i] != c):
            log.warning("put of %r to node %s: the bytes hashed differently on the way (%#x, node %#x)",
                        key[:16], node_id, c, landed or 0)
            return False
        sums[i], blocks[i] = c, b
        return True

    # -- reads -------------------------------------------------------------------------

    def _get_flow(self, keys: list[bytes], views: list[Dest] | None, ranges: Ranges,
                  deadline: float) -> Flow[list[Any]]:
        """Per key: the destination that holds the verified bytes (a new bytearray when
        ``views`` is None), or None on a miss."""
        keys = yield from self._scoped(keys, deadline)
        out: list[Any] = [None] * len(keys)
        dests: list[Dest | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        if self._locations is not None:
            known = {i: loc for i in todo if (loc := self._locations.get(keys[i])) is not None}
            if known:
                self._prepare(known, views, ranges, out, dests)
                got = yield from self._one_sided_flow(known, keys, dests, ranges)
                rest = {i: loc for i, loc in known.items() if i not in got}
                if rest:
                    fresh = yield from self._replicas_flow({i: [loc.node] for i, loc in rest.items()}, keys, dests,
                                                           rest, ranges, deadline)
                    for i, loc in fresh.items():
                        self._locations.put(keys[i], loc)
                    got.update(fresh)
                for i in got:
                    out[i] = dests[i] if views is not None else out[i]
                self._locations.forget([keys[i] for i in known if i not in got])
                todo = [i for i in todo if i not in got]
                self.counters["location_cache.hits"] += len(got)
        if not todo:
            yield from self._report_bad_flow(deadline)
            return out
        resp = yield Master("Lookup", mpb.LookupRequest(keys=[keys[i] for i in todo], client_host=self.host_id),
                            deadline)
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
        got = yield from self._replicas_flow(pending, keys, dests, locs, ranges, deadline)
        for i in pending:
            if i in got:
                if views is not None:
                    out[i] = dests[i]
                if self._locations is not None:
                    self._locations.put(keys[i], got[i])
            else:
                out[i] = None
                self.counters["misses.unavailable"] += 1
        yield from self._report_bad_flow(deadline)
        return out

    @staticmethod
    def _prepare(locs: dict[int, Any], views: list[Dest] | None, ranges: Ranges, out: list[Any],
                 dests: list[Dest | None]) -> None:
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

    def _one_sided_flow(self, known: dict[int, Known], keys: list[bytes], dests: list[Dest | None],
                        ranges: Ranges) -> Flow[dict[int, Known]]:
        """Read what same-host nodes hold at a remembered place, with no round trip.

        Returns the indices read and verified; the rest take the leased path.
        """
        got: dict[int, Known] = {}
        by_node: dict[int, tuple[MappedNode, list[int]]] = {}
        for i, loc in known.items():
            rs = ranges[i] if ranges is not None else None
            if loc.offset < 0 or (rs is not None and loc.sums is None):
                continue
            try:
                conn = yield Connect(loc.node)
            except TransportError:
                continue
            if conn.mapped is None or dests[i] is None:
                continue
            by_node.setdefault(id(conn.mapped), (conn.mapped, []))[1].append(i)
        for mapped, idxs in by_node.values():
            reads = [(keys[i], known[i], dests[i], ranges[i] if ranges is not None else None) for i in idxs]
            for i, st in zip(idxs, mapped.read_many(reads, copier=self._copier_for(reads)),  # type: ignore[arg-type]
                             strict=True):
                if st == SlotStatus.OK:
                    got[i] = known[i]
                    self.counters["hits"] += 1
                    self.counters["hits.one_sided"] += 1
                elif st == SlotStatus.CORRUPT:
                    self.counters["one_sided.corrupt"] += 1
                else:
                    self.counters["one_sided.stale"] += 1
        return got

    def _replicas_flow(self, pending: dict[int, list[mpb.NodeInfo]], keys: list[bytes],
                       dests: list[Dest | None], locs: dict[int, Any], ranges: Ranges,
                       deadline: float) -> Flow[dict[int, Known]]:
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
                    ok = yield from self._read_node_flow(nodes[node_id], idxs, keys, dests, locs, ranges, deadline)
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

    def _read_node_flow(self, node: mpb.NodeInfo, idxs: list[int], keys: list[bytes],
                        dests: list[Dest | None], locs: dict[int, Any], ranges: Ranges,
                        deadline: float) -> Flow[dict[int, Known]]:
        """Read ``idxs`` from one node into ``dests``: the indices read and verified, with
        where they were. Same host: ACQUIRE holds the values in place, one verified copy
        each out of the mapped arena, RELEASE later. Otherwise one FETCH."""
        conn = yield Connect(node)
        rs_of = [ranges[i] if ranges is not None else None for i in idxs]
        good: dict[int, Known] = {}
        if conn.mapped is None:
            # bytes from a socket land contiguously: a Scattered destination gets them through
            # a bounce buffer, once verified; a CUDA one through pinned host memory
            lands = {i: memoryview(bytearray(len(d))) if isinstance(d, Scattered) else self._copier().staging(len(d))
                     for i in idxs if isinstance(d := dests[i], (Scattered, DeviceBuffer))}
            into = [lands[i] if i in lands else _contiguous(dests[i]) for i in idxs]
            replies = yield Fetch(conn, [FetchRequest(keys[i], locs[i].checksum, dst, rs)
                                         for i, dst, rs in zip(idxs, into, rs_of, strict=True)], deadline)
            for i, (reply, ok) in zip(idxs, replies, strict=True):
                if reply.status != SlotStatus.OK:
                    continue
                if ok and i in lands:
                    dst = dests[i]
                    if isinstance(dst, DeviceBuffer):
                        self._copier().to_device(dst, lands[i])
                    else:
                        assert isinstance(dst, Scattered)
                        dst.write(0, lands[i])
                if ok:
                    good[i] = Known(node, reply.size, reply.checksum, sums=np.frombuffer(reply.sums, dtype="<u8"))
                else:
                    self._corrupt(keys[i], node, locs[i].checksum)
            if any(isinstance(dests[i], DeviceBuffer) for i in good):
                self._copier().wait()  # landed on the GPU before the call returns
            return good
        slots = [Acquired(*s) for s in (yield NodeCall(conn, Op.ACQUIRE, [keys[i] for i in idxs], deadline))]
        held = [(i, s, rs) for i, s, rs in zip(idxs, slots, rs_of, strict=True) if s.status == SlotStatus.OK]
        try:
            reads, cands = [], []
            for i, s, rs in held:
                dst = dests[i]
                loc = Known(node, s.size, s.checksum, s.offset, s.generation, np.frombuffer(s.sums, dtype="<u8"))
                # the node must hold the version the master (or the cache) vouches for
                if dst is not None and s.checksum == locs[i].checksum:
                    reads.append((keys[i], loc, dst, rs))
                    cands.append(i)
                else:
                    self._corrupt(keys[i], node, locs[i].checksum)
            for i, (_, loc, _, _), st in zip(cands, reads, conn.mapped.read_many(
                    reads, held=True, copier=self._copier_for(reads)), strict=True):
                if st == SlotStatus.OK:
                    good[i] = loc
                else:
                    self._corrupt(keys[i], node, locs[i].checksum)
        finally:
            yield Release(conn, [s.handle for _, s, _ in held])
        return good

    def _corrupt(self, key: bytes, node: mpb.NodeInfo, checksum: int) -> None:
        self.counters["misses.corrupt"] += 1
        log.warning("%s", Corruption(f"value of {key[:16]!r} from node {node.node_id} "
                                     "failed verification; treated as a miss (reported to the master)"))
        with self._bad_lock:
            self._bad.append(mpb.BadReplica(key=key, node_id=node.node_id, checksum=checksum))

    def _report_bad_flow(self, deadline: float) -> Flow[None]:
        """Tell the master which replicas failed verification, so it stops listing them
        (and LongestPrefix stops counting them). Best effort: a failure is logged."""
        with self._bad_lock:
            bad, self._bad = self._bad, []
        if not bad:
            return
        try:
            yield Master("ReportBad", mpb.ReportBadRequest(items=bad), max(deadline, time.monotonic() + 1))
            self.counters["bad_replicas_reported"] += len(bad)
        except KVStoreError as e:
            log.warning("could not report %d bad replica(s) to the master: %s", len(bad), e)

    # -- metadata ------------------------------------------------------------------------

    def _scoped(self, keys: list[bytes], deadline: float) -> Flow[list[bytes]]:
        """The keys as the pool names them: a tenant's credential confines it to keys that
        start with its scope (``@TENANT/``, from ``Hello``, asked once), prepended here. So
        does a client certificate that names a tenant (mutual TLS, kvstore.tls)."""
        if self._key_prefix is None:
            if self.token is None and (self.tls is None or self.tls.cert is None):
                self._key_prefix = b""
            else:
                try:
                    hello = yield Master("Hello", mpb.HelloRequest(), deadline)
                except KVStoreError as e:
                    if "UNIMPLEMENTED" not in str(e):
                        raise
                    hello = mpb.HelloResponse()  # a master from before scopes: keys as given
                self._key_prefix = bytes(hello.key_prefix)
        prefix = self._key_prefix
        return [prefix + k for k in keys] if prefix else keys

    def _exists_flow(self, keys: list[bytes], deadline: float) -> Flow[list[bool]]:
        keys = yield from self._scoped(keys, deadline)
        resp = yield Master("Lookup", mpb.LookupRequest(keys=keys), deadline)
        return [loc.status == mpb.OK for loc in resp.locations]

    def _prefix_flow(self, keys: list[bytes], deadline: float) -> Flow[int]:
        if not keys:
            return 0
        keys = yield from self._scoped(keys, deadline)
        resp = yield Master("LongestPrefix", mpb.LongestPrefixRequest(keys=keys), deadline)
        return int(resp.count)

    def _stats_flow(self, deadline: float) -> Flow[mpb.StatsResponse]:
        resp: mpb.StatsResponse = yield Master("Stats", mpb.StatsRequest(), deadline)
        return resp

    def _pin_flow(self, keys: list[bytes], pinned: bool, deadline: float) -> Flow[list[bool]]:
        """Pin (or unpin) complete objects: ``True`` per key the pool holds."""
        keys = yield from self._scoped(keys, deadline)
        resp = yield Master("Pin" if pinned else "Unpin", mpb.PinRequest(keys=keys), deadline)
        return [st == mpb.OK for st in resp.statuses]

    def _remove_flow(self, keys: list[bytes], force: bool, deadline: float) -> Flow[list[bool]]:
        """Remove through the master, then tell the holding nodes at once (so no cached
        location serves the key); a node that can't be reached learns it at its next
        heartbeat."""
        keys = yield from self._scoped(keys, deadline)
        if self._locations is not None:
            self._locations.forget(keys)
        where = yield Master("Lookup", mpb.LookupRequest(keys=keys), deadline)
        resp = yield Master("Remove", mpb.RemoveRequest(keys=keys, force=force), deadline)
        holders: dict[str, tuple[mpb.NodeInfo, list[bytes]]] = {}
        for k, st, loc in zip(keys, resp.statuses, where.locations, strict=True):
            if st == mpb.OK:
                for n in loc.nodes:
                    holders.setdefault(n.node_id, (n, []))[1].append(k)
        for node, removed in holders.values():
            try:
                conn = yield Connect(node)
                yield NodeCall(conn, Op.REMOVE, removed, time.monotonic() + self.timeout)
            except KVStoreError as e:
                log.info("node %s not told of %d removal(s) now (its heartbeat will): %s",
                         node.node_id, len(removed), e)
        out = []
        hint = {mpb.LEASED: "leased by a reader; retry or remove(force=True)", mpb.PINNED: "pinned; unpin it first"}
        for k, st in zip(keys, resp.statuses, strict=True):
            if st in hint:
                raise status_error(mpb.ItemStatus.Name(st), f"key {k[:16]!r} is {hint[st]}") or KVStoreError()
            out.append(st == mpb.OK)
        return out


def _contiguous(d: Dest | None) -> memoryview | None:
    """A destination that is contiguous host memory (or none)."""
    if d is not None and not isinstance(d, memoryview):
        raise AssertionError(f"contiguous host memory expected, got {d!r}")
    return d
