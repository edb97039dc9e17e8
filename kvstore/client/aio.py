"""``AsyncClient``: every :class:`~kvstore.client.Client` call, natively on asyncio.

The same flows as the blocking client (:mod:`kvstore.client.core`), driven with
awaits: the master through ``grpc.aio``, nodes' control channels through
non-blocking sockets (:class:`~kvstore.node.control_aio.AsyncControlClient`:
bytes received straight into the caller's buffers). No thread per call. The
same-host one-sided copies run on the event loop (a 4 MiB chunk copies and
verifies in well under a millisecond); read holds are released in background
tasks. Use one AsyncClient from one event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import grpc

from kvstore.client.connections import GRPC_OPTIONS, Connections, NodeConn
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
from kvstore.errors import KVStoreError, Timeout, TransportError
from kvstore.keys import check_key
from kvstore.master.discovery import MasterAddress
from kvstore.master.errors import error_from_rpc
from kvstore.master.fast import AsyncFastMasterClient, resolve
from kvstore.node.control_aio import AsyncControlClient
from kvstore.node.protocol import Maps, Op
from kvstore.v1 import master_pb2 as mpb
from kvstore.v1 import master_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")


class AsyncClient(ClientCore):
    """``AsyncClient(master, **Client options)``; ``async with`` or ``await close()``."""

    def __init__(self, master: str = "127.0.0.1:5555", **kwargs: Any) -> None:
        super().__init__(master, **kwargs)
        # host:port, or etcd://.../CLUSTER: the leader of a cluster of masters, followed on failover
        self._address = MasterAddress(master)
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._dialed = ""
        self._fast_master = ""
        # Node connections and same-host mappings; the control clients are async ones.
        self._conns = Connections(self.host_id, same_host=self.same_host, timeout=self.timeout, token=self.token)
        self._tasks: set[asyncio.Task[None]] = set()

    # -- running flows -----------------------------------------------------------------

    async def _run(self, flow: Flow[T]) -> T:
        try:
            effect = next(flow)
            while True:
                try:
                    result = await self._do(effect)
                except BaseException as e:  # noqa: BLE001 - handed to the flow, which decides
                    effect = flow.throw(e)
                else:
                    effect = flow.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _do(self, e: Effect) -> Any:
        if isinstance(e, Master):
            remaining = self._attempt(e)
            try:
                fast = await self._fast_channel(remaining)
                if fast is not None:
                    try:
                        if e.post is not None:
                            await fast.post(e.method, e.request, remaining, e.post)
                            return None
                        if e.ordered:
                            await fast.settle()
                        return await fast.call(e.method, e.request, remaining)
                    except TransportError:
                        self._fast, self._fast_retry_at = None, time.monotonic() + FAST_RETRY
                        fast.close()
                        raise
                return await self._grpc(e.method, e.request, remaining)
            except (TransportError, Timeout):
                self._address.stale()  # a cluster's leader may have changed: ask etcd again
                raise
        if isinstance(e, Connect):
            return await self._connect(e.node)
        if isinstance(e, Release):
            if e.handles:
                task = asyncio.get_running_loop().create_task(self._release(e.conn, e.handles))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return None
        remaining = e.deadline - time.monotonic()
        try:
            if isinstance(e, NodeCall):
                return await e.conn.control.call(e.op, e.items, remaining)
            if isinstance(e, Fetch):
                return await e.conn.control.fetch(e.requests, remaining)
            if isinstance(e, Store):
                return await e.conn.control.store(e.requests, remaining)
        except TransportError:
            self._conns.drop(e.conn)
            raise
        raise AssertionError(f"unknown effect {e!r}")

    async def _master_stub(self, timeout: float) -> Any:
        address = await self._address.current_async(timeout)
        if address != self._dialed or self._stub is None:
            if self._channel is not None:
                await self._channel.close()
            self._channel = grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) if self.tls is None \
                else grpc.aio.secure_channel(address, self.tls.grpc_credentials(), options=GRPC_OPTIONS)
            self._stub = master_pb2_grpc.MasterStub(self._channel)  # type: ignore[no-untyped-call]
            self._dialed = address
        return self._stub

    async def _grpc(self, method: str, request: Any, timeout: float) -> Any:
        stub = await self._master_stub(timeout)
        try:
            return await getattr(stub, method)(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err, f"master {self._dialed}") from err

    async def _fast_channel(self, timeout: float) -> AsyncFastMasterClient | None:
        """See :meth:`Client._fast_channel`."""
        master = await self._address.current_async(timeout)
        if master != self._fast_master:  # a new leader: its own framed channel
            if self._fast is not None:
                self._fast.close()
            self._fast, self._fast_retry_at, self._fast_master = None, 0.0, master
        if self._fast is None and time.monotonic() >= self._fast_retry_at:
            self._fast_retry_at = time.monotonic() + FAST_RETRY
            try:
                hello = await self._grpc("Hello", mpb.HelloRequest(), min(timeout, 2.0))
            except KVStoreError as err:
                if "UNIMPLEMENTED" in str(err):
                    self._fast_retry_at = float("inf")  # a master without it
                log.debug("no framed master channel (%s); using gRPC", err)
                return None
            if hello.fast_address:
                self._fast = AsyncFastMasterClient(resolve(hello.fast_address, master), self._auth,
                                                   tls=self._tls)
        fast: AsyncFastMasterClient | None = self._fast
        return fast

    async def _connect(self, node: mpb.NodeInfo) -> NodeConn:
        conn = self._conns.cached(node)
        if conn is not None:
            return conn
        conn = NodeConn(node.node_id, node.epoch, AsyncControlClient(
            node.control_address, self.timeout, token=self._conns.token, session=self._conns.session,
            tls=self._tls))
        ep = self._conns.shm_endpoint(node)
        if ep is not None:
            try:
                info = Maps(*(await conn.control.call(Op.MAPS, ["shm"], self.timeout))[0])
            except (KVStoreError, TypeError, ValueError) as err:
                log.warning("node %s: same-host memory not mapped (%s)", node.node_id, err)
            else:
                self._conns.map(conn, ep, info)  # a local socket and two mmaps: quick, once per node
        return self._conns.add(conn)

    async def _release(self, conn: NodeConn, handles: list[int]) -> None:
        try:
            await conn.control.call(Op.RELEASE, handles, 5.0)
        except KVStoreError as err:  # the node reclaims holds after its TTL
            log.debug("release on node %s failed (reclaimed after its TTL): %s", conn.node_id, err)

    async def _retrying(self, make: Callable[[float], Flow[T]], timeout: float | None) -> T:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        delay = 0.02
        for attempt in itertools.count():
            try:
                return await self._run(make(deadline))
            except KVStoreError as e:
                if self._give_up(e, attempt):
                    raise
                wait = min(delay * (1 + random.random()), deadline - time.monotonic())
                if wait <= 0:
                    raise
                await asyncio.sleep(wait)
                delay = min(delay * 2, self._max_delay)
        raise AssertionError("unreachable")

    # -- the Client API, awaited --------------------------------------------------------

    async def put(self, key: bytes | str, value: Any, *, timeout: float | None = None) -> bool:
        return (await self.put_batch([(key, value)], timeout=timeout))[0]

    async def put_from(self, key: bytes | str, buffer: Any, *, timeout: float | None = None) -> bool:
        return await self.put(key, buffer, timeout=timeout)

    async def put_batch(self, items: Sequence[tuple[bytes | str, Any]], *,
                        timeout: float | None = None) -> list[bool]:
        keys, views = self._put_args(items)
        return await self._retrying(lambda d: self._put_flow(keys, views, d), timeout)

    async def get(self, key: bytes | str, *, timeout: float | None = None) -> bytearray | None:
        return (await self.get_batch([key], timeout=timeout))[0]

    async def get_batch(self, keys: Sequence[bytes | str], *,
                        timeout: float | None = None) -> list[bytearray | None]:
        ks = [check_key(k) for k in keys]
        return await self._retrying(lambda d: self._get_flow(ks, None, None, d), timeout)

    async def get_into(self, key: bytes | str, buffer: Any, *, ranges: Sequence[tuple[int, int]] | None = None,
                       timeout: float | None = None) -> int | None:
        return (await self.get_into_batch([key], [buffer], ranges=None if ranges is None else [ranges],
                                          timeout=timeout))[0]

    async def get_into_batch(self, keys: Sequence[bytes | str], buffers: Sequence[Any], *,
                             ranges: Sequence[Sequence[tuple[int, int]] | None] | None = None,
                             timeout: float | None = None) -> list[int | None]:
        ks, views, rs = self._get_into_args(keys, buffers, ranges)
        res = await self._retrying(lambda d: self._get_flow(ks, views, rs, d), timeout)
        return [None if r is None else len(r) for r in res]

    async def exists(self, key: bytes | str, *, timeout: float | None = None) -> bool:
        return (await self.exists_batch([key], timeout=timeout))[0]

    async def exists_batch(self, keys: Sequence[bytes | str], *, timeout: float | None = None) -> list[bool]:
        ks = [check_key(k) for k in keys]
        return await self._retrying(lambda d: self._exists_flow(ks, d), timeout)

    async def longest_prefix(self, keys: Sequence[bytes | str], *, timeout: float | None = None) -> int:
        ks = [check_key(k) for k in keys]
        return await self._retrying(lambda d: self._prefix_flow(ks, d), timeout)

    async def remove(self, key: bytes | str, *, force: bool = False, timeout: float | None = None) -> bool:
        return (await self.remove_batch([key], force=force, timeout=timeout))[0]

    async def remove_batch(self, keys: Sequence[bytes | str], *, force: bool = False,
                           timeout: float | None = None) -> list[bool]:
        ks = [check_key(k) for k in keys]
        return await self._retrying(lambda d: self._remove_flow(ks, force, d), timeout)

    async def pin_batch(self, keys: Sequence[bytes | str], *, timeout: float | None = None) -> list[bool]:
        ks = [check_key(k) for k in keys]
        return await self._retrying(lambda d: self._pin_flow(ks, True, d), timeout)

    async def unpin_batch(self, keys: Sequence[bytes | str], *, timeout: float | None = None) -> list[bool]:
        ks = [check_key(k) for k in keys]
        return await self._retrying(lambda d: self._pin_flow(ks, False, d), timeout)

    async def stats(self, *, timeout: float | None = None) -> mpb.StatsResponse:
        return await self._retrying(self._stats_flow, timeout)

    async def watch_events(self, *, after: int = 0, from_now: bool = False,
                           timeout: float | None = None) -> AsyncIterator[mpb.PoolEvent]:
        """:meth:`Client.watch_events <kvstore.client.Client.watch_events>` on asyncio:
        ``async for ev in client.watch_events(after=seq): ...``."""
        await self._master_stub(self.timeout)
        assert self._channel is not None
        stub = master_pb2_grpc.EventsStub(self._channel)  # type: ignore[no-untyped-call]
        call = stub.Watch(mpb.WatchRequest(after=after, from_now=from_now), timeout=timeout,
                          metadata=self._metadata)
        try:
            async for ev in call:
                yield ev
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
                return
            raise error_from_rpc(err, f"master {self._dialed}") from err
        finally:
            call.cancel()

    async def flush(self, *, timeout: float | None = None) -> None:
        """See :meth:`Client.flush`."""
        fast = self._fast
        if fast is not None:
            await fast.settle(self.timeout if timeout is None else timeout)
        self._raise_lost()

    async def close(self) -> None:
        """Let pending releases go out, read the replies posted puts are still owed,
        then close every connection."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        self._conns.close()
        if self._fast is not None:
            await self._fast.aclose()
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
