"""The master's framed channel: the same calls as its gRPC service, one TCP frame each.

A gRPC round trip through Python's stack costs ~1 ms here, and a put makes two
(PutStart, PutEnd); the node control channel showed a framed request/reply over
a plain socket costs ~0.1 ms (docs/design/node-control.md). So the master
serves its calls on a second port too, for clients' hot paths: the request and
response are the same protobuf messages, handled by the same
:meth:`MasterServicer.call` (same validation, limits, token, journal), on the
same event loop. Clients learn the address from ``Hello`` and fall back to gRPC
when it is off (``master.fast_port = -1``) or unreachable.

Frame (both directions)::

    header  struct "<4sBBHI": magic b"KVMF", version, op, flags, payload length
    payload the call's protobuf message (error replies: msgpack [status name, message])

``op`` is 1 + the call's index in :data:`METHODS` (the .proto's order); op 0
(AUTH) carries the client's ``authorization`` value once per connection. A reply
sets :data:`REPLY_BIT` on the op, and :data:`FLAG_ERROR` when it is an error. A
frame over ``master.max_message``, an unknown op or an undecodable message gets
an error reply and the connection is closed. No pickle.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc
import msgpack
from google.protobuf.message import DecodeError

from kvstore.errors import KVStoreError, Timeout, TransportError
from kvstore.framing import FLAG_ERROR, HEADER, REPLY_BIT, Framing
from kvstore.master.errors import error_from_status
from kvstore.v1 import master_pb2 as pb
from transport.wire import AsyncStream, connect_tcp, recv_bytes

log = logging.getLogger(__name__)

MAGIC = b"KVMF"
VERSION = 1
FRAMING = Framing(MAGIC, VERSION, "master")
AUTH = 0
_SERVICE = pb.DESCRIPTOR.services_by_name["Master"]
METHODS = tuple(_SERVICE.methods_by_name)
"""Every RPC of the Master service, in .proto order (op = 1 + index: append new RPCs last)."""
REQUESTS = {name: getattr(pb, _SERVICE.methods_by_name[name].input_type.name) for name in METHODS}
RESPONSES = {name: getattr(pb, _SERVICE.methods_by_name[name].output_type.name) for name in METHODS}
OPS = {name: i + 1 for i, name in enumerate(METHODS)}


frame = FRAMING.pack
parse = FRAMING.parse


def resolve(advertised: str, master: str) -> str:
    """The address to dial: a wildcard host the master bound is reached at the host
    the client already uses for the master."""
    host, _, port = advertised.rpartition(":")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = master.rpartition(":")[0]
    return f"{host}:{port}"


def decode_reply(name: str, op: int, rop: int, flags: int, body: bytes, address: str) -> Any:
    """The call's response message, or the error it was answered with."""
    if flags & FLAG_ERROR:
        try:
            code_name, message = msgpack.unpackb(body, raw=False)
            code = grpc.StatusCode[code_name]
        except (ValueError, KeyError, TypeError, msgpack.UnpackException):
            return TransportError(f"master {address}: malformed error reply to {name}")
        return error_from_status(code, str(message), f"master {address}: {name}")
    if rop != op | REPLY_BIT:
        return TransportError(f"master {address}: reply out of step for {name}")
    try:
        return RESPONSES[name].FromString(body)
    except DecodeError:
        return TransportError(f"master {address}: undecodable {name} reply")


Done = Callable[[Any], None]
"""Told the outcome of a posted call once its reply is read: the response, or the
KVStoreError the call failed with."""

SPARE = 2
"""A caller with no idle connection opens a new one while fewer calls than this are
posted, and otherwise reads the oldest posted reply and reuses its connection: in a
stream of puts, each ``PutStart`` goes out while the previous ``PutEnd`` is still
being answered on the other connection, and reads a reply that has long arrived."""


class _Posted(NamedTuple):
    sock: Any  # socket.socket (blocking client) or AsyncStream (asyncio client)
    name: str
    op: int
    deadline: float
    done: Done


# -- blocking client ------------------------------------------------------------------


class FastMasterClient:
    """Calls the framed channel; a pool of connections, one call each. Thread-safe.

    :meth:`post` sends a call without waiting for its reply (a put's ``PutEnd``): the
    reply is read, and handed to the call's ``done``, when its connection is needed
    again, or by :meth:`settle` / :meth:`close`. The master handles each connection's
    frames in order and applies a call as soon as it reads it, so a posted call takes
    effect whether or not its reply is ever read."""

    def __init__(self, address: str, authorization: bytes | None, limit: int = 64 << 20,
                 tls: ssl.SSLContext | None = None) -> None:
        host, _, port = address.rpartition(":")
        self._addr = (host.strip("[]"), int(port))
        self.address = address
        self._auth = authorization
        self._limit = limit
        self._tls = tls
        self._idle: list[socket.socket] = []
        self._posted: deque[_Posted] = deque()
        self._lock = threading.Lock()

    def call(self, name: str, request: Any, timeout: float) -> Any:
        """The response; raises the mapped KVStoreError (TransportError: the channel failed)."""
        sock, op, deadline = self._start(name, request, timeout)
        out = self._reply(sock, name, op, deadline)
        if isinstance(out, KVStoreError):
            raise out
        return out

    def post(self, name: str, request: Any, timeout: float, done: Done) -> None:
        """Send the call and return at once; ``done`` gets its outcome later (see the
        class). Raises as :meth:`call` when it cannot be sent (then nothing was posted)."""
        sock, op, deadline = self._start(name, request, timeout)
        with self._lock:
            self._posted.append(_Posted(sock, name, op, deadline, done))

    def settle(self, limit: float | None = None) -> None:
        """Read every posted call's reply, oldest first, and hand it to its ``done``;
        ``limit``: wait at most this long for each (a silent master fails them)."""
        while True:
            with self._lock:
                if not self._posted:
                    return
                p = self._posted.popleft()
            self._settle(p, limit)

    def _settle(self, p: _Posted, limit: float | None = None) -> None:
        deadline = p.deadline if limit is None else min(p.deadline, time.monotonic() + limit)
        try:
            out = self._reply(p.sock, p.name, p.op, deadline)
        except KVStoreError as e:
            out = e
        p.done(out)

    def _start(self, name: str, request: Any, timeout: float) -> tuple[socket.socket, int, float]:
        """Send the call on a connection of the pool: (that connection, op, deadline)."""
        if timeout <= 0:
            raise Timeout(f"deadline expired before {name}")
        op = OPS[name]
        sock = self._take(timeout)
        deadline = time.monotonic() + timeout
        self._send(sock, name, op, request, timeout)
        return sock, op, deadline

    def _send(self, sock: socket.socket, name: str, op: int, request: Any, timeout: float) -> None:
        try:
            sock.settimeout(timeout)
            sock.sendall(frame(op, request.SerializeToString()))
        except TimeoutError as e:
            sock.close()
            raise Timeout(f"{name} to master {self.address} timed out after {timeout:.1f}s") from e
        except OSError as e:
            sock.close()
            raise TransportError(f"{name} to master {self.address}: {e}") from e

    def _reply(self, sock: socket.socket, name: str, op: int, deadline: float) -> Any:
        """Read the reply to the call sent last on ``sock``: the response or the mapped
        KVStoreError it answered (the connection goes back to the pool); raises Timeout
        or TransportError when the channel failed (the connection is closed)."""
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            rop, flags, length = parse(recv_bytes(sock, HEADER.size), self._limit)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            out = decode_reply(name, op, rop, flags, recv_bytes(sock, length), self.address)
        except TimeoutError as e:
            sock.close()
            raise Timeout(f"{name} to master {self.address}: no reply in time") from e
        except (OSError, ValueError, TransportError) as e:
            sock.close()
            raise TransportError(f"{name} to master {self.address}: {e}") from e
        if isinstance(out, TransportError):
            sock.close()
            raise out
        with self._lock:
            self._idle.append(sock)
        return out

    def _take(self, timeout: float) -> socket.socket:
        while True:
            with self._lock:
                if self._idle:
                    return self._idle.pop()
                if len(self._posted) < SPARE:
                    break
                oldest = self._posted.popleft()
            self._settle(oldest)  # its connection goes back to the pool, or is closed
        try:
            sock = connect_tcp(self._addr, min(timeout, 5.0))
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._addr[0])
        except OSError as e:  # ssl.SSLError included: a certificate that does not verify
            raise TransportError(f"cannot reach master {self.address}: {e}") from e
        if self._auth is not None:
            try:
                sock.settimeout(min(timeout, 5.0))
                sock.sendall(frame(AUTH, self._auth))
                parse(recv_bytes(sock, HEADER.size), 0)
            except (OSError, ValueError, TransportError) as e:
                sock.close()
                raise TransportError(f"master {self.address}: authentication frame failed: {e}") from e
        return sock

    def close(self, settle: float = 2.0) -> None:
        """Read the replies still owed to posted calls (at most ``settle`` seconds each),
        then close every connection."""
        self.settle(settle)
        with self._lock:
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()


class AsyncFastMasterClient:
    """:class:`FastMasterClient` on asyncio (non-blocking sockets, one event loop)."""

    def __init__(self, address: str, authorization: bytes | None, limit: int = 64 << 20,
                 tls: ssl.SSLContext | None = None) -> None:
        host, _, port = address.rpartition(":")
        self._addr = (host.strip("[]"), int(port))
        self.address = address
        self._auth = authorization
        self._limit = limit
        self._tls = tls
        self._idle: list[AsyncStream] = []
        self._posted: deque[_Posted] = deque()

    async def call(self, name: str, request: Any, timeout: float) -> Any:
        sock, op, deadline = await self._start(name, request, timeout)
        out = await self._reply(sock, name, op, deadline)
        if isinstance(out, KVStoreError):
            raise out
        return out

    async def post(self, name: str, request: Any, timeout: float, done: Done) -> None:
        """See :meth:`FastMasterClient.post`."""
        sock, op, deadline = await self._start(name, request, timeout)
        self._posted.append(_Posted(sock, name, op, deadline, done))

    async def settle(self, limit: float | None = None) -> None:
        """See :meth:`FastMasterClient.settle`."""
        while self._posted:
            await self._settle(self._posted.popleft(), limit)

    async def _settle(self, p: _Posted, limit: float | None = None) -> None:
        deadline = p.deadline if limit is None else min(p.deadline, time.monotonic() + limit)
        try:
            out = await self._reply(p.sock, p.name, p.op, deadline)
        except KVStoreError as e:
            out = e
        p.done(out)

    async def _start(self, name: str, request: Any, timeout: float) -> tuple[AsyncStream, int, float]:
        """See :meth:`FastMasterClient._start`."""
        if timeout <= 0:
            raise Timeout(f"deadline expired before {name}")
        op = OPS[name]
        sock = await self._take(timeout)
        deadline = time.monotonic() + timeout
        await self._send(sock, name, op, request, deadline)
        return sock, op, deadline

    async def _send(self, sock: AsyncStream, name: str, op: int, request: Any, deadline: float) -> None:
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                await sock.sendall(frame(op, request.SerializeToString()))
        except TimeoutError as e:
            sock.close()
            raise Timeout(f"{name} to master {self.address} timed out") from e
        except OSError as e:
            sock.close()
            raise TransportError(f"{name} to master {self.address}: {e}") from e
        except BaseException:  # cancelled mid-frame
            sock.close()
            raise

    async def _reply(self, sock: AsyncStream, name: str, op: int, deadline: float) -> Any:
        """See :meth:`FastMasterClient._reply`."""
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):
                rop, flags, length = parse(await sock.recv_bytes(HEADER.size), self._limit)
                out = decode_reply(name, op, rop, flags, await sock.recv_bytes(length), self.address)
        except TimeoutError as e:
            sock.close()
            raise Timeout(f"{name} to master {self.address}: no reply in time") from e
        except (OSError, ValueError, TransportError) as e:
            sock.close()
            raise TransportError(f"{name} to master {self.address}: {e}") from e
        except BaseException:  # cancelled mid-frame
            sock.close()
            raise
        if isinstance(out, TransportError):
            sock.close()
            raise out
        self._idle.append(sock)
        return out

    async def _take(self, timeout: float) -> AsyncStream:
        while not self._idle and len(self._posted) >= SPARE:
            await self._settle(self._posted.popleft())
        if self._idle:
            return self._idle.pop()
        try:
            sock = await AsyncStream.open(self._addr, min(timeout, 5.0), self._tls)
        except (OSError, TimeoutError) as e:  # ssl.SSLError included
            raise TransportError(f"cannot reach master {self.address}: {e}") from e
        if self._auth is not None:
            try:
                async with asyncio.timeout(min(timeout, 5.0)):
                    await sock.sendall(frame(AUTH, self._auth))
                    parse(await sock.recv_bytes(HEADER.size), 0)
            except (OSError, TimeoutError, ValueError, TransportError) as e:
                sock.close()
                raise TransportError(f"master {self.address}: authentication frame failed: {e}") from e
        return sock

    async def aclose(self, settle: float = 2.0) -> None:
        """Read the replies still owed to posted calls (at most ``settle`` seconds each),
        then close every connection."""
        await self.settle(settle)
        self.close()

    def close(self) -> None:
        """Close every connection now; replies still owed to posted calls are not read
        (their ``done`` is told the channel closed)."""
        posted, self._posted = self._posted, deque()
        for p in posted:
            p.sock.close()
            p.done(TransportError(f"{p.name} to master {self.address}: the channel closed before its reply"))
        idle, self._idle = self._idle, []
        for s in idle:
            s.close()
