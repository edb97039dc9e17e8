"""Serving the master's framed channel (the protocol and its clients: :mod:`kvstore.master.fast`)."""

from __future__ import annotations

import asyncio
import socket
import ssl

import msgpack
from google.protobuf.message import DecodeError

from kvstore.framing import FLAG_ERROR, HEADER, REPLY_BIT
from kvstore.master.errors import CallError
from kvstore.master.fast import AUTH, METHODS, REQUESTS, frame, parse
from kvstore.master.servicer import MasterServicer
from kvstore.tls import identity_of


async def serve_fast(servicer: MasterServicer, host: str, port: int,
                     tls: ssl.SSLContext | None = None) -> asyncio.Server:
    """Serve the framed channel on the current loop; sets ``servicer.fast_address``."""
    limit = servicer.config.max_message

    open_conns = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_conns
        if open_conns >= servicer.config.max_fast_connections:
            writer.close()  # over the cap: the client falls back to gRPC
            return
        open_conns += 1
        try:
            await serve(reader, writer)
        finally:
            open_conns -= 1

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        auth: bytes | None = None
        tls = writer.get_extra_info("ssl_object")
        der = tls.getpeercert(binary_form=True) if tls is not None else None
        peer = identity_of(der) if der else None  # verified by the handshake (mutual TLS)
        try:
            while True:
                op, _flags, length = parse(await reader.readexactly(HEADER.size), limit)
                body = await reader.readexactly(length)
                if op == AUTH:
                    auth = body
                    writer.write(frame(AUTH | REPLY_BIT, b""))
                    continue
                if not 1 <= op <= len(METHODS):
                    raise ValueError(f"unknown op {op}")
                name = METHODS[op - 1]
                try:
                    resp = await servicer.call_async(name, REQUESTS[name].FromString(body), auth, peer)
                    writer.write(frame(op | REPLY_BIT, resp.SerializeToString()))
                except CallError as e:
                    writer.write(frame(op | REPLY_BIT, msgpack.packb([e.code.name, e.message]), FLAG_ERROR))
                await writer.drain()
        except (ValueError, DecodeError) as e:  # the stream can no longer be trusted: answer, hang up
            writer.write(frame(REPLY_BIT, msgpack.packb(["INVALID_ARGUMENT", f"bad request: {e}"]), FLAG_ERROR))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):  # the client went away
            pass
        except asyncio.CancelledError:  # the server is stopping: end quietly (asyncio would log it)
            return
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port, ssl=tls)
    bound = server.sockets[0].getsockname()
    servicer.fast_address = f"{host}:{bound[1]}"
    return server
