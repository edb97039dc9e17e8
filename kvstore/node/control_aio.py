"""The node control channel's client on asyncio: :class:`ControlClient`'s calls, awaited.

Same frames, same checks (:func:`~kvstore.node.control.check_reply`), same
receive plans for FETCH (:class:`~kvstore.node.control.ReceivePlan`): bytes go
straight from the socket into the caller's buffers (``sock_recv_into``), no
thread involved. A pool of connections, one call each; use it from one event
loop.
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import msgpack

from kvstore.errors import InvalidArgument, PermissionDenied, Timeout, TransportError
from kvstore.framing import HEADER
from kvstore.node.control import (
    FetchRequest,
    ReceivePlan,
    StoreRequest,
    _unpack,
    auth_frame,
    check_auth,
    check_reply,
    fetch_items,
    store_item,
    store_tail,
)
from kvstore.node.protocol import Fetched, Op, Stored, pack_frame, parse_header
from transport.wire import AsyncStream


class AsyncControlClient:
    """Calls a node's control server from asyncio code. Not thread-safe (one loop)."""

    def __init__(self, address: str, connect_timeout: float = 5.0, *, token: str | None = None,
                 session: bytes | None = None, tls: ssl.SSLContext | None = None) -> None:
        host, _, port = address.rpartition(":")
        self._addr = (host.strip("[]"), int(port))
        self.address = address
        self._connect_timeout = connect_timeout
        self._auth = auth_frame(token, session or secrets.token_bytes(16))
        self._tls = tls
        self._idle: list[AsyncStream] = []

    async def call(self, op: Op, items: list[Any], timeout: float) -> list[Any]:
        out: list[Any] = await self._exchange(op, items, timeout)
        return out

    async def fetch(self, requests: list[FetchRequest], timeout: float) -> list[tuple[Fetched, bool]]:
        """See :meth:`ControlClient.fetch`."""

        async def receive(sock: AsyncStream, payload: list[Any]) -> list[tuple[Fetched, bool]]:
            out = []
            for reply, r in zip(payload, requests, strict=True):
                plan = ReceivePlan(Fetched(*reply), r)
                for i, views in enumerate(plan.blocks):
                    for v in views:
                        await sock.recv_into(v)
                    plan.landed(i)
                out.append((plan.reply, plan.ok()))
            return out

        got: list[tuple[Fetched, bool]] = await self._exchange(Op.FETCH, fetch_items(requests), timeout,
                                                               receive=receive)
        return got

    async def store(self, requests: list[StoreRequest], timeout: float) -> list[Stored]:
        """See :meth:`ControlClient.store`."""
        payload = await self._exchange(Op.STORE, [store_item(r) for r in requests], timeout,
                                       tail=store_tail(requests))
        return [Stored(*r) for r in payload]

    async def _exchange(self, op: Op, items: list[Any], timeout: float, *, tail: Iterable[memoryview] | None = None,
                        receive: Callable[[AsyncStream, list[Any]], Awaitable[Any]] | None = None) -> Any:
        if timeout <= 0:
            raise Timeout(f"deadline expired before {op.name} to node {self.address}")
        sock = await self._take(timeout)
        try:
            async with asyncio.timeout(timeout):
                await sock.sendall(pack_frame(op, msgpack.packb(items)))
                for view in tail or ():
                    await sock.sendall(view)
                rop, flags, length = parse_header(await sock.recv_bytes(HEADER.size))
                payload = check_reply(op, rop, flags, _unpack(await sock.recv_bytes(length)), len(items),
                                      self.address)
                out = payload if receive is None else await receive(sock, payload)
        except TimeoutError as e:
            sock.close()
            raise Timeout(f"{op.name} to node {self.address} timed out after {timeout:.1f}s") from e
        except (OSError, ConnectionError, ValueError, TypeError, TransportError) as e:
            sock.close()
            if isinstance(e, InvalidArgument):
                raise
            raise TransportError(f"{op.name} to node {self.address}: {e}") from e
        except BaseException:  # cancelled mid-frame: the stream is out of step
            sock.close()
            raise
        self._idle.append(sock)
        return out

    async def _take(self, timeout: float) -> AsyncStream:
        if self._idle:
            return self._idle.pop()
        try:
            sock = await AsyncStream.open(self._addr, min(timeout, self._connect_timeout), self._tls)
        except (OSError, TimeoutError) as e:  # ssl.SSLError included
            raise TransportError(f"cannot reach node control {self.address}: {e}") from e
        try:  # every connection opens with AUTH (see ControlClient)
            async with asyncio.timeout(min(timeout, self._connect_timeout)):
                await sock.sendall(self._auth)
                rop, flags, length = parse_header(await sock.recv_bytes(HEADER.size))
                check_auth(rop, flags, _unpack(await sock.recv_bytes(length)), self.address)
        except (OSError, ValueError, TypeError, TimeoutError, TransportError) as e:
            sock.close()
            if isinstance(e, (PermissionDenied, InvalidArgument)):
                raise
            raise TransportError(f"AUTH to node {self.address}: {e}") from e
        return sock

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for s in idle:
            s.close()
