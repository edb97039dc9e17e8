"""The master's gRPC service (``grpc.aio``): validates, translates, persists. No logic.

Every RPC runs on one event loop: validate the request against the explicit
limits, call :class:`~kvstore.master.state.MasterState`, write the state's
journal to RocksDB in one batch, map the result to protobuf. A periodic task
ticks the state (expiry) and refreshes the metrics snapshot.

Limits (``master.*`` config): messages up to ``max_message`` bytes (grpc
answers RESOURCE_EXHAUSTED beyond), at most ``max_batch`` items per request
(RESOURCE_EXHAUSTED), keys of 1..256 bytes and node ids of 1..256 characters
(INVALID_ARGUMENT). A rejected request changes nothing; the master stays up.

In-process use: ``await start_master(cfg)`` on your own loop, or
``serve_master(cfg)`` which runs the master on a background thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from kvstore.config import MasterConfig
from kvstore.errors import ConfigError, KVStoreError, NoSpace, TransportError
from kvstore.master.convert import (
    endpoints_in,
    held_in,
    items_in,
    lookup_out,
    put_start_out,
    stats_out,
    statuses_out,
    tiers_in,
)
from kvstore.master.errors import NO_SPACE_MARKER, status_for
from kvstore.master.metrics import MasterMetrics
from kvstore.master.persist import MasterStore
from kvstore.master.state import MasterState
from kvstore.v1 import master_pb2 as pb
from kvstore.v1 import master_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_KEY = 256  # bytes; the proto contract
MAX_NODE_ID = 256

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _Reject(Exception):
    """A request-level refusal: the whole call fails with ``code``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def read_token(path: Path | None) -> str | None:
    """The shared token from ``path`` (whitespace stripped); ConfigError when unusable."""
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"master.token_file {path}: {e.strerror}") from e
    if not token:
        raise ConfigError(f"master.token_file {path} is empty; put the shared token in it")
    return token


class Clock:
    """Milliseconds, monotonic, anchored to the wall clock at start (readable in Stats)."""

    def __init__(self) -> None:
        self._wall0 = time.time_ns() // 1_000_000
        self._mono0 = time.monotonic_ns()

    def __call__(self) -> int:
        return self._wall0 + (time.monotonic_ns() - self._mono0) // 1_000_000


class MasterServicer(pb_grpc.MasterServicer):  # type: ignore[misc]
    """Translates RPCs to :class:`MasterState` calls. Runs on one event loop only."""

    def __init__(self, state: MasterState, config: MasterConfig, *,
                 store: MasterStore | None = None, metrics: MasterMetrics | None = None,
                 token: str | None = None, clock: Callable[[], int] | None = None) -> None:
        self.state = state
        self.config = config
        self.store = store
        self.metrics = metrics or MasterMetrics()
        self.clock = clock or Clock()
        self._token = f"Bearer {token}".encode() if token else None
        self._unwritten: list[Any] = []
        for name in ("RegisterNode", "Heartbeat", "PutStart", "PutEnd", "PutRevoke", "Lookup",
                     "LongestPrefix", "ReleaseLeases", "Remove", "Pin", "Unpin", "Stats"):
            setattr(self, name, self._wrap(name, getattr(self, "_" + name)))

    # -- plumbing ---------------------------------------------------------------

    def _wrap(self, name: str, fn: Callable[[Any], Any]) -> Callable[[Any, Any], Awaitable[Any]]:
        hist = self.metrics.rpc_seconds.labels(name)

        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            t0 = time.perf_counter()
            try:
                if self._token is not None:
                    self._check_token(context)
                resp = fn(request)
                self.flush()
                return resp
            except _Reject as e:
                self.metrics.rpc_errors.labels(name, e.code.name).inc()
                await context.abort(e.code, str(e))
            except KVStoreError as e:
                code = status_for(e)
                self.metrics.rpc_errors.labels(name, code.name).inc()
                log.error("master %s failed: %s", name, e)
                await context.abort(code, f"{NO_SPACE_MARKER} {e}" if isinstance(e, NoSpace)
                                    else str(e))
            finally:
                hist.observe(time.perf_counter() - t0)

        return handler

    def _check_token(self, context: grpc.aio.ServicerContext) -> None:
        assert self._token is not None
        for k, v in context.invocation_metadata() or ():
            if k == "authorization":
                got = v.encode() if isinstance(v, str) else bytes(v)
                if hmac.compare_digest(got, self._token):
                    return
                raise _Reject(grpc.StatusCode.UNAUTHENTICATED,
                              "bad token; send metadata 'authorization: Bearer <master.token_file>'")
        raise _Reject(grpc.StatusCode.UNAUTHENTICATED,
                      "this master requires a token; send metadata "
                      "'authorization: Bearer <token from master.token_file>'")

    def flush(self) -> None:
        """Write the state's journal in one batch; a failed write is retried on the next call."""
        records = self._unwritten + self.state.take_journal()
        self._unwritten = []
        if self.store is None or not records:
            return
        try:
            self.store.write(records)
        except KVStoreError:
            self._unwritten = records
            raise

    def _batch(self, n: int, what: str) -> None:
        if n > self.config.max_batch:
            raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{what}: {n} items exceed master.max_batch={self.config.max_batch}; "
                          "split the request into smaller batches")

    def _keys(self, keys: Sequence[bytes], what: str) -> None:
        self._batch(len(keys), what)
        if keys:
            lens = list(map(len, keys))
            if min(lens) < 1 or max(lens) > MAX_KEY:
                i = next(i for i, n in enumerate(lens) if not 1 <= n <= MAX_KEY)
                raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                              f"{what}: key #{i} has {lens[i]} bytes; keys must be 1..{MAX_KEY} "
                              "bytes (chunk keys are 32-byte digests)")

    def _node_id(self, node_id: str) -> None:
        if not 1 <= len(node_id) <= MAX_NODE_ID:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                          f"node_id must be 1..{MAX_NODE_ID} characters, got {len(node_id)}")

    # -- RPCs -------------------------------------------------------------------

    def _RegisterNode(self, req: pb.RegisterNodeRequest) -> pb.RegisterNodeResponse:
        self._node_id(req.node_id)
        self._keys([h.key for h in req.held], "RegisterNode.held")
        if len(req.endpoints) > 64 or len(req.tiers) > 64:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                          "RegisterNode: at most 64 endpoints and 64 tiers")
        r = self.state.register_node(self.clock(), req.node_id, req.host, req.control_address,
                                     endpoints_in(req.endpoints), tiers_in(req.tiers),
                                     held_in(req.held))
        if r.drop:
            log.info("node %s registered (epoch %d), told to drop %d stale keys",
                     req.node_id, r.epoch, len(r.drop))
        return pb.RegisterNodeResponse(epoch=r.epoch, heartbeat_interval_ms=r.heartbeat_interval_ms,
                                       node_ttl_ms=r.node_ttl_ms, drop=r.drop)

    def _Heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        self._node_id(req.node_id)
        self._keys(req.lost, "Heartbeat.lost")
        r = self.state.heartbeat(self.clock(), req.node_id, req.epoch, tiers_in(req.tiers),
                                 list(req.lost))
        return pb.HeartbeatResponse(reregister=r.reregister, remove=r.remove)

    def _PutStart(self, req: pb.PutStartRequest) -> pb.PutStartResponse:
        self._keys([i.key for i in req.items], "PutStart")
        if req.replicas > self.config.max_replicas:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                          f"PutStart: replicas={req.replicas} exceeds master.max_replicas="
                          f"{self.config.max_replicas}")
        r = self.state.put_start(self.clock(), items_in(req.items), req.replicas, req.client_host)
        return put_start_out(r)

    def _PutEnd(self, req: pb.PutEndRequest) -> pb.PutEndResponse:
        self._keys(req.keys, "PutEnd")
        return pb.PutEndResponse(statuses=statuses_out(
            self.state.put_end(self.clock(), req.put_id, req.keys)))

    def _PutRevoke(self, req: pb.PutRevokeRequest) -> pb.PutRevokeResponse:
        self._keys(req.keys, "PutRevoke")
        st = self.state.put_revoke(self.clock(), req.put_id, req.keys)
        return pb.PutRevokeResponse(statuses=statuses_out(st))

    def _Lookup(self, req: pb.LookupRequest) -> pb.LookupResponse:
        self._keys(req.keys, "Lookup")
        r = self.state.lookup(self.clock(), req.keys, req.lease, req.client_host)
        return lookup_out(r)

    def _LongestPrefix(self, req: pb.LongestPrefixRequest) -> pb.LongestPrefixResponse:
        self._keys(req.keys, "LongestPrefix")
        return pb.LongestPrefixResponse(count=self.state.longest_prefix(self.clock(), req.keys))

    def _ReleaseLeases(self, req: pb.ReleaseLeasesRequest) -> pb.ReleaseLeasesResponse:
        self._batch(len(req.lease_ids), "ReleaseLeases")
        self.state.release_leases(self.clock(), req.lease_ids)
        return pb.ReleaseLeasesResponse()

    def _Remove(self, req: pb.RemoveRequest) -> pb.RemoveResponse:
        self._keys(req.keys, "Remove")
        return pb.RemoveResponse(statuses=statuses_out(
            self.state.remove(self.clock(), req.keys, req.force)))

    def _Pin(self, req: pb.PinRequest) -> pb.PinResponse:
        self._keys(req.keys, "Pin")
        return pb.PinResponse(statuses=statuses_out(
            self.state.pin(self.clock(), req.keys)))

    def _Unpin(self, req: pb.PinRequest) -> pb.PinResponse:
        self._keys(req.keys, "Unpin")
        return pb.PinResponse(statuses=statuses_out(
            self.state.unpin(self.clock(), req.keys)))

    def _Stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        return stats_out(self.state.stats(self.clock()))

    # -- periodic ---------------------------------------------------------------

    def tick(self) -> None:
        """Expire what is due, persist, refresh metrics. Logs; raises only KVStoreError."""
        now = self.clock()
        r = self.state.tick(now)
        for nid in r.dead_nodes:
            log.warning("node %s missed its heartbeats for %.1fs: dead, its replicas are gone",
                        nid, self.state.node_ttl_ms / 1000)
        self.flush()
        self.metrics.update(self.state.stats(now))


# -- serving ------------------------------------------------------------------------


class MasterServer:
    """A running master on the current event loop (from :func:`start_master`).

    Attributes: ``port`` (gRPC), ``address`` (``host:port``), ``metrics_port``
    (``None`` when disabled), ``state`` (inspect it only from this loop).
    """

    def __init__(self, server: grpc.aio.Server, servicer: MasterServicer, port: int,
                 metrics_port: int | None, tick_s: float) -> None:
        self.server = server
        self.servicer = servicer
        self.state = servicer.state
        self.port = port
        self.address = f"{servicer.config.host}:{port}"
        self.metrics_port = metrics_port
        self._stopped = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop(tick_s))

    async def _tick_loop(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                self.servicer.tick()
            except KVStoreError as e:
                log.error("master tick: %s", e)

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving (in-flight RPCs get ``grace`` seconds), persist, close.

        Idempotent and safe to call concurrently: every caller waits for the one shutdown.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._stop(grace))
        await asyncio.shield(self._stop_task)

    async def _stop(self, grace: float) -> None:
        self._ticker.cancel()
        try:
            await self.server.stop(grace)
            self.servicer.flush()
        finally:
            self.servicer.metrics.close()
            if self.servicer.store is not None:
                self.servicer.store.close()
            self._stopped.set()

    async def wait_stopped(self) -> None:
        """Return once the master has shut down (after :meth:`stop`)."""
        await self._stopped.wait()


async def start_master(config: MasterConfig, *, token: str | None = None,
                       clock: Callable[[], int] | None = None) -> MasterServer:
    """Open the data dir, restore the state, bind ``config.host:config.port`` and serve.

    ``token`` overrides ``config.token_file``. Raises :class:`KVStoreError`
    (``TransportError`` when the port cannot be bound). Call on the loop that
    will run the master; stop it with ``await server.stop()``.
    """
    clock = clock or Clock()
    token = token if token is not None else read_token(config.token_file)
    state = MasterState(
        node_ttl_ms=int(config.node_ttl * 1000),
        heartbeat_interval_ms=int(config.heartbeat_interval * 1000),
        put_ttl_ms=int(config.put_ttl * 1000), lease_ttl_ms=int(config.lease_ttl * 1000),
        max_replicas=config.max_replicas)
    store = None
    if config.data_dir is not None:
        store = MasterStore(config.data_dir, sync=config.sync_writes)
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
    opts = [("grpc.max_receive_message_length", config.max_message),
            ("grpc.max_send_message_length", config.max_message),
            ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=opts)
    pb_grpc.add_MasterServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    try:
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
    servicer.flush()
    metrics.update(state.stats(clock()))
    tick_s = min(0.5, config.node_ttl / 4)
    return MasterServer(server, servicer, port, metrics_port, tick_s)


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

    def call(self, fn: Callable[[MasterServer], Resp]) -> Resp:
        """Run ``fn(server)`` on the master's loop (to inspect its state safely)."""
        assert self._loop is not None and self._server is not None
        server = self._server

        async def run() -> Resp:
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
