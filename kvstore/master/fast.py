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
from typing import Any

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


# -- blocking client ------------------------------------------------------------------


class FastMasterClient:
    """Calls the framed channel; a pool of connections, one call each. Thread-safe."""

    def __init__(self, address: str, authorization: bytes | None, limit: int = 64 << 20,
                 tls: ssl.SSLContext | None = None) -> None:
        host, _, port = address.rpartition(":")
        self._addr = (host.strip("[]"), int(port))
        self.address = address
        self._auth = authorization
        self._limit = limit
        self._tls = tls
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def call(self, name: str, request: Any, timeout: float) -> Any:
        """The response; raises the mapped KVStoreError (TransportError: the channel failed)."""
        if timeout <= 0:
            raise Timeout(f"deadline expired before {name}")
        op = OPS[name]
        sock = self._take(timeout)
        deadline = time.monotonic() + timeout
        try:
            sock.settimeout(timeout)
            sock.sendall(frame(op, request.SerializeToString()))
            rop, flags, length = parse(recv_bytes(sock, HEADER.size), self._limit)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            out = decode_reply(name, op, rop, flags, recv_bytes(sock, length), self.address)
        except TimeoutError as e:
            sock.close()
            raise Timeout(f"{name} to master {self.address} timed out after {timeout:.1f}s") from e
        except (OSError, ValueError, TransportError) as e:
            sock.close()
            raise TransportError(f"{name} to master {self.address}: {e}") from e
        if isinstance(out, TransportError):
            sock.close()
            raise out
        with self._lock:
            self._idle.append(sock)
        if isinstance(out, KVStoreError):
            raise out
        return out

    def _take(self, timeout: float) -> socket.socket:
        with self._lock:
            if self._idle:
                return self._idle.pop()
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

    def close(self) -> None:
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

    async def call(self, name: str, request: Any, timeout: float) -> Any:
        if timeout <= 0:
            raise Timeout(f"deadline expired before {name}")
        op = OPS[name]
        sock = await self._take(timeout)
        try:
            async with asyncio.timeout(timeout):
                await sock.sendall(frame(op, request.SerializeToString()))
                rop, flags, length = parse(await sock.recv_bytes(HEADER.size), self._limit)
                out = decode_reply(name, op, rop, flags, await sock.recv_bytes(length), self.address)
        except TimeoutError as e:
            sock.close()
            raise Timeout(f"{name} to master {self.address} timed out after {timeout:.1f}s") from e
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
        if isinstance(out, KVStoreError):
            raise out
        return out

    async def _take(self, timeout: float) -> AsyncStream:
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

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for s in idle:
            s.close()
