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

A put makes one master round trip on its path: ``PutStart``; its ``PutEnd`` is sent
once the bytes are committed and answered later. The writer sees its puts at once,
other clients once the master has read that frame (before they could ask, on
loopback); :meth:`Client.flush` waits for the answers and raises ``TryAgain`` for
a put the master lost meanwhile (docs/design/hot-path.md, "Writes").

``cache_locations`` (on by default; an int sets the number of entries) remembers
where keys were written or found and reads them from that node without asking
the master. On the same host such a read is one-sided: one verified copy out of
the node's mapped arena on the caller's thread, no round trip at all
(:mod:`kvstore.client.samehost`); elsewhere it is one ACQUIRE to the node.
See :mod:`kvstore.client.locations` and docs/design/hot-path.md. The logic is
written once, without I/O, in :mod:`kvstore.client.core`; this class runs it
with blocking calls (:class:`~kvstore.client.AsyncClient` with awaits).
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from kvstore.client.connections import GRPC_OPTIONS, Connections
from kvstore.client.core import (
    FAST_RETRY,
    ClientCore,
    Connect,
    Effect,
    Fetch,
    Flow,
    Master,
    NodeCall,
    Release,
    Store,
)
from kvstore.client.releaser import Releaser
from kvstore.errors import KVStoreError, Timeout, TransportError
from kvstore.keys import check_key
from kvstore.master.discovery import MasterLink
from kvstore.master.errors import error_from_rpc
from kvstore.master.fast import FastMasterClient, resolve
from kvstore.v1 import master_pb2 as mpb

log = logging.getLogger(__name__)
T = TypeVar("T")


class Client(ClientCore):
    """Synchronous client. See the module docstring for the contract.

    ``Client(master, timeout=10.0, retries=5, replicas=1, same_host=True, token=None,
    host=None, cache_locations=True, tls_ca=None, tls_cert=None, tls_key=None)``.
    """

    def __init__(self, master: str = "127.0.0.1:5555", **kwargs: Any) -> None:
        super().__init__(master, **kwargs)
        # host:port, or etcd://.../CLUSTER: the leader of a cluster of masters, followed on failover
        self._link = MasterLink(master, GRPC_OPTIONS, tls=self.tls)
        self._fast_master = ""  # the master whose framed channel self._fast is
        self._conns = Connections(self.host_id, same_host=self.same_host, timeout=self.timeout, token=self.token,
                                  tls=self._tls)
        self._releaser = Releaser()

    # -- running flows -----------------------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        """Drive a flow: perform each effect it yields, send back the result (or throw the error)."""
        try:
            effect = next(flow)
            while True:
                try:
                    result = self._do(effect)
                except BaseException as e:  # noqa: BLE001 - handed to the flow, which decides
                    effect = flow.throw(e)
                else:
                    effect = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _do(self, e: Effect) -> Any:
        if isinstance(e, Master):
            remaining = self._attempt(e)
            try:
                fast = self._fast_channel(remaining)
                if fast is not None:
                    try:
                        if e.post is not None:
                            fast.post(e.method, e.request, remaining, e.post)
                            return None
                        if e.ordered:
                            fast.settle()
                        return fast.call(e.method, e.request, remaining)
                    except TransportError:
                        self._fast, self._fast_retry_at = None, time.monotonic() + FAST_RETRY
                        fast.close()
                        raise
                return self._grpc(e.method, e.request, remaining)
            except (TransportError, Timeout):
                self._link.failed()  # a cluster's leader may have changed: ask etcd again
                raise
        if isinstance(e, Connect):
            return self._conns.get(e.node)
        if isinstance(e, Release):
            self._releaser.release(e.conn, e.handles)
            return None
        remaining = e.deadline - time.monotonic()
        try:
            if isinstance(e, NodeCall):
                return e.conn.control.call(e.op, e.items, remaining)
            if isinstance(e, Fetch):
                return e.conn.control.fetch(e.requests, remaining)
            if isinstance(e, Store):
                return e.conn.control.store(e.requests, remaining)
        except TransportError:
            self._conns.drop(e.conn)
            raise
        raise AssertionError(f"unknown effect {e!r}")

    def _grpc(self, method: str, request: Any, timeout: float) -> Any:
        stub = self._link.stub(timeout)
        try:
            return getattr(stub, method)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err, f"master {self._link.dialed}") from err

    def _fast_channel(self, timeout: float) -> FastMasterClient | None:
        """The master's framed channel, asking it once (then after failures, at most every
        FAST_RETRY seconds); None: use gRPC."""
        master = self._link.address.current(timeout)
        if master != self._fast_master:  # a new leader: its own framed channel
            if self._fast is not None:
                self._fast.close()
            self._fast, self._fast_retry_at, self._fast_master = None, 0.0, master
        if self._fast is None and time.monotonic() >= self._fast_retry_at:
            self._fast_retry_at = time.monotonic() + FAST_RETRY
            try:
                hello = self._grpc("Hello", mpb.HelloRequest(), min(timeout, 2.0))
            except KVStoreError as err:
                if "UNIMPLEMENTED" in str(err):
                    self._fast_retry_at = float("inf")  # a master without it
                log.debug("no framed master channel (%s); using gRPC", err)
                return None
            if hello.fast_address:
                self._fast = FastMasterClient(resolve(hello.fast_address, master), self._auth, tls=self._tls)
        fast: FastMasterClient | None = self._fast
        return fast

    def _retrying(self, make: Callable[[float], Flow[T]], timeout: float | None) -> T:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        delay = 0.02
        for attempt in itertools.count():
            try:
                return self._run(make(deadline))
            except KVStoreError as e:
                if self._give_up(e, attempt):
                    raise
                wait = min(delay * (1 + random.random()), deadline - time.monotonic())
                if wait <= 0:
                    raise
                log.debug("retrying after %s (attempt %d)", e, attempt + 1)
                time.sleep(wait)
                delay = min(delay * 2, self._max_delay)
        raise AssertionError("unreachable")

    # -- writes ------------------------------------------------------------------------

    def put(self, key: bytes | str, value: Any, *, timeout: float | None = None) -> bool:
        """Store ``value`` (any buffer) under ``key``; ``False`` if the key already exists."""
        return self.put_batch([(key, value)], timeout=timeout)[0]

    def put_from(self, key: bytes | str, buffer: Any, *, timeout: float | None = None) -> bool:
        """Like :meth:`put`, sending straight from ``buffer`` (no staging copy)."""
        return self.put(key, buffer, timeout=timeout)

    def put_batch(self, items: Sequence[tuple[bytes | str, Any]], *,
                  timeout: float | None = None) -> list[bool]:
        """Store every ``(key, value)``; all are validated before anything is sent. A value
        is any C-contiguous buffer, contiguous CUDA memory (a torch CUDA tensor, a CuPy
        array: docs/gpu.md), or a :class:`~kvstore.scatter.Scattered` whose pieces are
        stored as one value laid end to end (not gathered first)."""
        keys, views = self._put_args(items)
        return self._retrying(lambda d: self._put_flow(keys, views, d), timeout)

    # -- reads -------------------------------------------------------------------------

    def get(self, key: bytes | str, *, timeout: float | None = None) -> bytearray | None:
        """A verified copy of the value (a new ``bytearray`` the caller owns), or ``None``
        on a miss (absent, or failed verification on every replica)."""
        return self.get_batch([key], timeout=timeout)[0]

    def get_into(self, key: bytes | str, buffer: Any, *, ranges: Sequence[tuple[int, int]] | None = None,
                 timeout: float | None = None) -> int | None:
        """Read into ``buffer`` (host memory, or CUDA memory: docs/gpu.md); returns the
        bytes written, or ``None`` on a miss.

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
        return self._retrying(lambda d: self._get_flow(ks, None, None, d), timeout)

    def get_into_batch(self, keys: Sequence[bytes | str], buffers: Sequence[Any], *,
                       ranges: Sequence[Sequence[tuple[int, int]] | None] | None = None,
                       timeout: float | None = None) -> list[int | None]:
        """:meth:`get_into` for many keys in one call (a key may repeat, e.g. with other
        ranges). ``ranges``: one entry per key (``None``: the whole value)."""
        ks, views, rs = self._get_into_args(keys, buffers, ranges)
        res = self._retrying(lambda d: self._get_flow(ks, views, rs, d), timeout)
        return [None if r is None else len(r) for r in res]

    # -- metadata ------------------------------------------------------------------------

    def exists(self, key: bytes | str, *, timeout: float | None = None) -> bool:
        return self.exists_batch([key], timeout=timeout)[0]

    def exists_batch(self, keys: Sequence[bytes | str], *, timeout: float | None = None) -> list[bool]:
        ks = [check_key(k) for k in keys]
        return self._retrying(lambda d: self._exists_flow(ks, d), timeout)

    def longest_prefix(self, keys: Sequence[bytes | str], *, timeout: float | None = None) -> int:
        """How many leading ``keys`` the pool holds (the engine's cache-hit question)."""
        ks = [check_key(k) for k in keys]
        return self._retrying(lambda d: self._prefix_flow(ks, d), timeout)

    def remove(self, key: bytes | str, *, force: bool = False, timeout: float | None = None) -> bool:
        return self.remove_batch([key], force=force, timeout=timeout)[0]

    def remove_batch(self, keys: Sequence[bytes | str], *, force: bool = False,
                     timeout: float | None = None) -> list[bool]:
        """Remove keys; ``True`` per removed key. Leased keys raise TryAgain unless ``force``.

        The nodes that held a removed key are told at once (not at their next
        heartbeat), so no client's cached location serves it afterwards.
        """
        ks = [check_key(k) for k in keys]
        return self._retrying(lambda d: self._remove_flow(ks, force, d), timeout)

    def pin_batch(self, keys: Sequence[bytes | str], *, timeout: float | None = None) -> list[bool]:
        """Pin keys (a pinned object is never evicted or removed, and an HA master's pins
        survive a failover); ``True`` per key the pool holds, ``False`` for a miss."""
        ks = [check_key(k) for k in keys]
        return self._retrying(lambda d: self._pin_flow(ks, True, d), timeout)

    def unpin_batch(self, keys: Sequence[bytes | str], *, timeout: float | None = None) -> list[bool]:
        """Undo :meth:`pin_batch` (evictable again); ``True`` per key the pool holds."""
        ks = [check_key(k) for k in keys]
        return self._retrying(lambda d: self._pin_flow(ks, False, d), timeout)

    def stats(self, *, timeout: float | None = None) -> mpb.StatsResponse:
        """The master's view: nodes with tiers, object/lease/pin counts, counters."""
        return self._retrying(self._stats_flow, timeout)

    def watch_events(self, *, after: int = 0, from_now: bool = False,
                     timeout: float | None = None) -> Iterator[mpb.PoolEvent]:
        """The pool's events (``PoolEvent``: STORED, REMOVED, EVICTED, LOST, REPLICA_LOST,
        NODE_JOINED, NODE_LEFT) numbered after ``after`` (or only new ones with ``from_now``),
        then as they happen; a RESYNC event says some were missed. Runs until the caller
        stops iterating, ``timeout`` seconds pass (then it ends quietly), or the master
        goes away (TransportError; resume with ``after`` = the last ``seq`` seen). A tenant's
        credential sees its own keys' events only (and node events)."""
        stream = self._link.events(self.timeout).Watch(
            mpb.WatchRequest(after=after, from_now=from_now), timeout=timeout, metadata=self._metadata)
        try:
            yield from stream
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
                return
            self._link.failed()
            raise error_from_rpc(err, f"master {self._link.dialed}") from err
        finally:
            stream.cancel()

    def flush(self, *, timeout: float | None = None) -> None:
        """Wait until the master has answered every put this client returned from.

        ``put`` returns once the value is committed on its node(s), with its ``PutEnd``
        sent to the master but not awaited: this client sees the key at once (each of
        its later calls waits for those answers first where it matters), and other
        clients as soon as the master has read that frame. ``flush`` raises
        :class:`~kvstore.errors.TryAgain` if one of those ``PutEnd`` calls failed since
        the last ``flush`` (the master lost the reservation: put those keys again);
        ``close`` waits too, and logs such failures. See docs/design/hot-path.md."""
        fast = self._fast
        if fast is not None:
            fast.settle(self.timeout if timeout is None else timeout)
        self._raise_lost()

    def close(self) -> None:
        self._releaser.close()
        self._conns.close()
        if self._fast is not None:
            self._fast.close()  # reads the replies posted puts are still owed
        self._link.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
