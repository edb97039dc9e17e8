"""Serving the master: ``start_master`` (asyncio), ``serve_master`` (a background thread).

``kvstore master`` and ``kvstore up`` use these; the RPC handlers are in
:mod:`kvstore.master.servicer`, the logic in :mod:`kvstore.master.state`.

Limits (``master.*`` config): messages up to ``max_message`` bytes, at most
``max_batch`` items per request, keys of 1..256 bytes; see docs/master.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

import grpc

from kvstore.config import MasterConfig
from kvstore.errors import ConfigError, KVStoreError, TransportError
from kvstore.hostid import is_loopback
from kvstore.master.discovery import EtcdTarget, parse_endpoints
from kvstore.master.election import Election
from kvstore.master.fast_server import serve_fast
from kvstore.master.metrics import MasterMetrics
from kvstore.master.persist import MasterStore
from kvstore.master.servicer import Clock, EventsServicer, MasterServicer, read_token
from kvstore.master.state import MasterState
from kvstore.tls import grpc_server_credentials, server_context
from kvstore.v1 import master_pb2_grpc as pb_grpc

__all__ = ["MasterServer", "MasterThread", "serve_master", "start_master"]

log = logging.getLogger(__name__)

R = TypeVar("R")


# -- serving ------------------------------------------------------------------------


class MasterServer:
    """A running master on the current event loop (from :func:`start_master`).

    Attributes: ``port`` (gRPC), ``address`` (``host:port``), ``metrics_port``
    (``None`` when disabled), ``state`` (inspect it only from this loop).
    """

    def __init__(self, server: grpc.aio.Server, servicer: MasterServicer, port: int,
                 metrics_port: int | None, tick_s: float, fast: asyncio.Server | None = None,
                 election: Election | None = None, new_state: Callable[[], MasterState] | None = None) -> None:
        self.server = server
        self.fast = fast
        self.fast_address = servicer.fast_address
        self.servicer = servicer
        self.election = election
        self.port = port
        self.address = f"{servicer.config.host}:{port}"
        self.metrics_port = metrics_port
        self._stopped = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop(tick_s))
        self._leader: asyncio.Task[None] | None = None
        if election is not None and new_state is not None:
            servicer.record_pins = election.save_pins
            self._leader = asyncio.get_running_loop().create_task(self._lead_loop(election, new_state))

    @property
    def state(self) -> MasterState:
        """The table this master serves (a standby's is empty; inspect it only from this loop)."""
        return self.servicer.state

    async def _lead_loop(self, election: Election, new_state: Callable[[], MasterState]) -> None:
        """Campaign; once elected, serve (the table rebuilt from the nodes, the pins from etcd)
        until the lease is lost; then drop the table (the new leader's is the pool's) and
        campaign again."""
        while True:
            await election.campaign()
            pins = await election.load_pins()  # pinned under an earlier leader: pinned again
            # nodes watch the leader key and re-register at once; the slowest within a heartbeat
            self.servicer.lead(new_state(), min(self.servicer.config.heartbeat_interval, 1.0), pins)
            self.servicer.leading = election.leading
            await election.lost.wait()
            self.servicer.leading = _never
            self.servicer.state = new_state()
            log.warning("master %s stepped down; campaigning again as a standby", election.name)

    async def _tick_loop(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                self.servicer.tick()
            except KVStoreError as e:
                log.error("master tick: %s", e)
            except Exception:  # noqa: BLE001 - a bug must not stop expiry; logged with its traceback
                log.exception("master tick failed; ticking on")

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving (in-flight RPCs get ``grace`` seconds), persist, close.

        Idempotent and safe to call concurrently: every caller waits for the one shutdown.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._stop(grace))
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float) -> None:
        self._ticker.cancel()
        if self._leader is not None:
            self._leader.cancel()
        if self.fast is not None:
            self.fast.close()
        try:
            await self.server.stop(grace)
            self.servicer.flush()
            if self.election is not None:
                await self.election.resign()  # a standby takes over now, not after a TTL
        finally:
            self.servicer.metrics.close()
            if self.servicer.store is not None:
                self.servicer.store.close()
            self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once the master has shut down (after :meth:`stop`)."""
        await self._stopped.wait()


def refuse_unprotected(config: MasterConfig, token: str | None) -> None:
    """Protected mode (as Redis has): a master reachable from other hosts must require a
    token, unless ``master.insecure`` says otherwise. Raises :class:`ConfigError`."""
    if token or config.auth_dir is not None or config.insecure or is_loopback(config.host):
        return
    raise ConfigError(
        f"master: refusing to serve {config.host} without authentication: anyone on the network could "
        "read the pool's metadata and register fake nodes. Set master.auth_dir (--auth-dir, from "
        "`kvstore auth init`) or master.token_file (--token-file; nodes and clients then send a token), "
        "bind 127.0.0.1, or set master.insecure = true.")


async def start_master(config: MasterConfig, *, token: str | None = None,
                       clock: Callable[[], int] | None = None) -> MasterServer:
    """Open the data dir, restore the state, bind ``config.host:config.port`` and serve.

    ``token`` overrides ``config.token_file``. Raises :class:`KVStoreError`
    (``TransportError`` when the port cannot be bound). Call on the loop that
    will run the master; stop it with ``await server.stop()``.
    """
    clock = clock or Clock()
    token = token if token is not None else read_token(config.token_file)
    refuse_unprotected(config, token)
    if config.etcd is not None:
        _aetcd_or_fail()
        if config.advertise is None and config.host in _WILDCARDS:
            raise ConfigError(f"master: bound to {config.host} with master.etcd: set master.advertise "
                              "(--advertise HOST:PORT), the address nodes and clients reach this master at")

    def new_state() -> MasterState:
        return MasterState(
            node_ttl_ms=int(config.node_ttl * 1000),
            heartbeat_interval_ms=int(config.heartbeat_interval * 1000),
            put_ttl_ms=int(config.put_ttl * 1000), lease_ttl_ms=int(config.lease_ttl * 1000),
            max_replicas=config.max_replicas,
            # the loop ticks every min(0.5 s, TTL/4): a silence of TTL/2 means the master itself stalled
            pause_ms=max(int(config.node_ttl * 500), 1000))

    state = new_state()
    store = None
    if config.data_dir is not None:
        store = MasterStore(config.data_dir, sync=config.sync_writes)
        if config.etcd is None:  # an elected master rebuilds its table from the nodes instead
            try:
                state.restore(store.load(), clock())
            except KVStoreError:
                store.close()
                raise
            s = state.stats(clock())
            log.info("master: restored %d objects on %d nodes from %s", s.objects, len(s.nodes),
                     config.data_dir)
    else:
        log.warning("master: no master.data_dir; metadata lives in memory only")
    metrics = MasterMetrics()
    servicer = MasterServicer(state, config, store=store, metrics=metrics, token=token,
                              clock=clock)
    if config.etcd is not None:
        servicer.leading = _never  # a standby until it wins the election
        servicer.standby_message = (f"this master is not the leader of cluster {config.cluster!r}: "
                                    f"ask etcd (etcd://{config.etcd}/{config.cluster}) for the leader")
    opts = [("grpc.max_receive_message_length", config.max_message),
            ("grpc.max_send_message_length", config.max_message),
            ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=opts, maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    pb_grpc.add_MasterServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    pb_grpc.add_EventsServicer_to_server(EventsServicer(servicer), server)  # type: ignore[no-untyped-call]
    try:
        if config.tls_cert is not None and config.tls_key is not None:
            port = server.add_secure_port(f"{config.host}:{config.port}",
                                          grpc_server_credentials(config.tls_cert, config.tls_key,
                                                                  config.tls_client_ca))
        else:
            port = server.add_insecure_port(f"{config.host}:{config.port}")
    except RuntimeError as e:
        port = 0
        err: Exception | None = e
    else:
        err = None
    if not port:
        if store is not None:
            store.close()
        raise TransportError(f"master: cannot bind {config.host}:{config.port} ({err or 'in use'}); "
                             "pick another --port or stop the process holding it")
    metrics_port = None
    try:
        if config.metrics_port >= 0:
            metrics_port = metrics.serve(config.host, config.metrics_port)
        await server.start()
    except (OSError, RuntimeError) as e:
        metrics.close()
        if store is not None:
            store.close()
        raise TransportError(f"master: cannot start on {config.host}: {e}") from e
    fast = None
    if config.fast_port >= 0:
        try:
            fast = await serve_fast(servicer, config.host, config.fast_port,
                                    server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
                                    if config.tls_cert is not None and config.tls_key is not None else None)
        except OSError as e:
            await server.stop(None)
            metrics.close()
            if store is not None:
                store.close()
            raise TransportError(f"master: cannot bind its framed channel {config.host}:{config.fast_port} ({e}); "
                                 "pick another master.fast_port (-1 turns it off)") from e
    servicer.flush()
    metrics.update(state.stats(clock()))
    tick_s = min(0.5, config.node_ttl / 4)
    election = None
    if config.etcd is not None:
        target = EtcdTarget(parse_endpoints(config.etcd), config.cluster)
        advertise = config.advertise or f"{config.host}:{port}"
        election = Election(target, advertise, f"{socket.gethostname()}:{os.getpid()}@{advertise}",
                            int(config.leader_ttl))
    return MasterServer(server, servicer, port, metrics_port, tick_s, fast, election, new_state)


_WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def _never() -> bool:
    return False


def _aetcd_or_fail() -> None:
    try:
        import aetcd  # noqa: F401
    except ImportError as e:
        raise ConfigError("master.etcd needs the aetcd package: pip install 'kvstore[ha]'") from e


class MasterThread:
    """A master serving on a background thread with its own event loop (:func:`serve_master`).

    ``address``/``port``/``metrics_port`` are set once started. :meth:`stop` blocks
    until it has shut down. A context manager.
    """

    def __init__(self, config: MasterConfig, token: str | None) -> None:
        self._config = config
        self._token = token
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: MasterServer | None = None
        self._thread = threading.Thread(target=self._run, name="kvstore-master", daemon=True)
        self.port = 0
        self.address = ""
        self.metrics_port: int | None = None

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self._server = await start_master(self._config, token=self._token)
        except BaseException as e:  # noqa: BLE001 - handed to the starting thread, re-raised there
            self._error = e
            self._ready.set()
            return
        self.port, self.address = self._server.port, self._server.address
        self.metrics_port = self._server.metrics_port
        self._ready.set()
        await self._server.wait_stopped()

    def start(self) -> MasterThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def call(self, fn: Callable[[MasterServer], R]) -> R:
        """Run ``fn(server)`` on the master's loop (to inspect its state safely)."""
        assert self._loop is not None and self._server is not None
        server = self._server

        async def run() -> R:
            return fn(server)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def stop(self, grace: float = 1.0) -> None:
        """Shut the master down and join its thread; idempotent."""
        if self._loop is not None and self._server is not None and self._thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)
            fut.result(timeout=grace + 30)
        self._thread.join(timeout=grace + 30)

    def __enter__(self) -> MasterThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_master(config: MasterConfig, *, token: str | None = None) -> MasterThread:
    """Start a master on a background thread; returns once it serves (or raises).

    ``with serve_master(cfg) as m: channel = grpc.insecure_channel(m.address)``.
    """
    return MasterThread(config, token).start()
