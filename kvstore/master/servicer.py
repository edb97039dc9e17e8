"""The master's gRPC servicer (``grpc.aio``): validates, translates, persists. No logic.

Every RPC runs on one event loop: validate the request against the explicit
limits, call :class:`~kvstore.master.state.MasterState`, write the state's
journal to RocksDB in one batch, map the result to protobuf. A periodic task
ticks the state (expiry) and refreshes the metrics snapshot.

Limits (``master.*`` config): messages up to ``max_message`` bytes (grpc
answers RESOURCE_EXHAUSTED beyond), at most ``max_batch`` items per request
(RESOURCE_EXHAUSTED), keys of 1..256 bytes and node ids of 1..256 characters
(INVALID_ARGUMENT). A rejected request changes nothing; the master stays up.

The server around it (binding, tick task, shutdown) is :mod:`kvstore.master.server`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from kvstore.auth import (
    CREDENTIALS,
    Credentials,
    Principal,
    TenantLimits,
    new_grant_key,
    write_grant,
)
from kvstore.config import MasterConfig
from kvstore.errors import ConfigError, KVStoreError, NoSpace
from kvstore.master import codec
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
from kvstore.master.errors import BUSY_MARKER, NO_SPACE_MARKER, CallError, status_for
from kvstore.master.events import EventLog
from kvstore.master.fast import METHODS
from kvstore.master.metrics import MasterMetrics
from kvstore.master.persist import MasterStore
from kvstore.master.state import MasterState
from kvstore.master.types import Status
from kvstore.tls import CertIdentity, identity_of_pem
from kvstore.v1 import master_pb2 as pb
from kvstore.v1 import master_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_KEY = 256  # bytes; the proto contract
MAX_NODE_ID = 256



NODE_CALLS = frozenset({"RegisterNode", "ReportHeld", "Heartbeat"})
# the keys each client call names (checked against the caller's tenant scope)
KEYED: dict[str, Callable[[Any], Iterable[bytes]]] = {
    "PutStart": lambda r: (i.key for i in r.items),
    "PutEnd": lambda r: r.keys,
    "PutRevoke": lambda r: r.keys,
    "Lookup": lambda r: r.keys,
    "LongestPrefix": lambda r: r.keys,
    "Remove": lambda r: r.keys,
    "Pin": lambda r: r.keys,
    "ReportBad": lambda r: (i.key for i in r.items),
}


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


def peer_identity(context: grpc.aio.ServicerContext) -> CertIdentity | None:
    """The identity the caller's TLS client certificate names, if it presented one that the
    handshake verified (mutual TLS) and that names one (kvstore.tls.identity_of)."""
    try:
        pem = context.auth_context().get("x509_pem_cert")
    except (AttributeError, ValueError):
        return None
    return identity_of_pem(bytes(pem[0])) if pem else None


def authorization(context: grpc.aio.ServicerContext) -> bytes | None:
    """The call's ``authorization`` metadata (``Bearer <token>``), if any."""
    return next((v.encode() if isinstance(v, str) else bytes(v)
                 for k, v in context.invocation_metadata() or () if k == "authorization"), None)


class MasterServicer(pb_grpc.MasterServicer):  # type: ignore[misc]
    """Translates RPCs to :class:`MasterState` calls. Runs on one event loop only."""

    def __init__(self, state: MasterState, config: MasterConfig, *,
                 store: MasterStore | None = None, metrics: MasterMetrics | None = None,
                 token: str | None = None, clock: Callable[[], int] | None = None) -> None:
        self.state = state
        self.config = config
        self.store = store
        self.grant_key = new_grant_key()
        """Signs write grants (kvstore.auth.write_grant); sent to nodes with the credentials."""
        self.metrics = metrics or MasterMetrics()
        self.clock = clock or Clock()
        # who may call: one shared token (master.token_file, every role) or a credentials
        # directory (master.auth_dir: tokens mapped to roles; re-read when it changes)
        self._caller: Principal | None = None  # of the call being served (one loop, one call at a time)
        self.credentials: Credentials | None = Credentials.shared(token) if token else \
            Credentials.load(config.auth_dir) if config.auth_dir is not None else None
        self._credentials_mtime = self._auth_mtime()
        self._unwritten: list[Any] = []
        self._pauses_logged = 0
        self.fast_address = ""
        """host:port of the framed channel (kvstore.master.fast), once it serves."""
        self.leading: Callable[[], bool] | None = None
        """With leader election (kvstore.master.election): whether this master leads now;
        every call is refused with UNAVAILABLE while it does not."""
        self.standby_message = ""
        self.warm_until = 0.0
        """Until then (monotonic; just elected) only nodes' calls are served: clients wait
        (UNAVAILABLE, retried) until the nodes have re-registered what they hold."""
        self.events = EventLog(config.events_window)
        self.record_pins: Callable[[list[tuple[bytes, int | None]]], Awaitable[None]] | None = None
        """With leader election: writes pins (key -> checksum of the pinned version; None:
        unpinned) where the next leader finds them (etcd), before the call is answered."""
        self._pin_changes: list[tuple[bytes, int | None]] = []
        self.methods: dict[str, Callable[[Any], Any]] = {name: getattr(self, "_" + name) for name in METHODS}
        for name in METHODS:
            setattr(self, name, self._wrap(name))

    # -- plumbing ---------------------------------------------------------------

    def call(self, name: str, request: Any, authorization: bytes | None, peer: CertIdentity | None = None) -> Any:
        """Run one call as either channel receives it: the response, or :class:`CallError`
        with the gRPC status to answer. ``peer``: the identity the caller's verified TLS
        client certificate names (kvstore.tls), used when it sends no token."""
        t0 = time.perf_counter()
        try:
            self._caller = None
            if self.credentials is not None:
                self._caller = self._authorize(name, authorization, peer)
                self._check_scope(name, request, self._caller)
            if self.leading is not None and not self.leading():
                raise _Reject(grpc.StatusCode.UNAVAILABLE, self.standby_message)
            if self.warm_until and name not in NODE_CALLS and time.monotonic() < self.warm_until:
                raise _Reject(grpc.StatusCode.UNAVAILABLE, "newly elected master: nodes are re-registering "
                              f"what they hold; retry in {self.warm_until - time.monotonic():.1f}s")
            resp = self.methods[name](request)
            self.flush()
            return resp
        except _Reject as e:
            self.metrics.rpc_errors.labels(name, e.code.name).inc()
            raise CallError(e.code, str(e)) from e
        except KVStoreError as e:
            code = status_for(e)
            self.metrics.rpc_errors.labels(name, code.name).inc()
            log.error("master %s failed: %s", name, e)
            raise CallError(code, f"{NO_SPACE_MARKER} {e}" if isinstance(e, NoSpace) else str(e)) from e
        finally:
            self.metrics.rpc_seconds.labels(name).observe(time.perf_counter() - t0)

    async def call_async(self, name: str, request: Any, authorization: bytes | None,
                         peer: CertIdentity | None = None) -> Any:
        """:meth:`call`, and then, for a pin or unpin under leader election, its record in
        etcd: the call is answered only once a failover would keep it (UNAVAILABLE, to be
        retried, when etcd cannot be written; the pin holds on this leader meanwhile)."""
        resp = self.call(name, request, authorization, peer)
        changes, self._pin_changes = self._pin_changes, []
        if changes and self.record_pins is not None:
            try:
                await self.record_pins(changes)
            except KVStoreError as e:
                self.metrics.rpc_errors.labels(name, "UNAVAILABLE").inc()
                raise CallError(grpc.StatusCode.UNAVAILABLE,
                                f"{name}: applied, but not recorded for a standby master ({e}); retry") from e
        return resp

    def _wrap(self, name: str) -> Callable[[Any, Any], Awaitable[Any]]:
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                token = authorization(context)  # the certificate is looked at only without a token
                return await self.call_async(name, request, token, peer_identity(context) if token is None else None)
            except CallError as e:
                await context.abort(e.code, e.message)

        return handler

    def _authorize(self, name: str, authorization: bytes | None, peer: CertIdentity | None = None) -> Principal:
        """The caller's token (or, without one, its certificate's identity) must stand for a
        role allowed to call ``name``."""
        assert self.credentials is not None
        where = "master.token_file" if self.credentials.source == "master.token_file" \
            else "the role's token file (master.auth_dir)"  # for the error messages below
        if authorization is None and peer is not None:
            who = self.credentials.of_certificate(peer.role, peer.tenant)
            if who is None:
                raise _Reject(grpc.StatusCode.PERMISSION_DENIED,
                              f"the client certificate names tenant {peer.tenant!r}, which this master's "
                              "credentials do not hold (add it with `kvstore auth add-tenant`)")
        elif authorization is None:
            raise _Reject(grpc.StatusCode.UNAUTHENTICATED,
                          f"this master requires a token; send metadata 'authorization: Bearer <token>' "
                          f"with the token from {where} (or, under mutual TLS, a client certificate "
                          "naming a tenant: `kvstore auth add-tenant --tls`)")
        else:
            token = authorization.removeprefix(b"Bearer ").strip()
            found = self.credentials.check(token)
            if found is None:
                raise _Reject(grpc.StatusCode.UNAUTHENTICATED,
                              f"bad token: send 'authorization: Bearer <token>' with the token from {where}")
            who = found
        if who.role != "admin" and name != "Hello" and (who.role == "node") != (name in NODE_CALLS):
            raise _Reject(grpc.StatusCode.PERMISSION_DENIED,
                          f"{name} is not allowed for a {who.role} credential "
                          f"({'only nodes register and heartbeat' if name in NODE_CALLS else 'nodes may only register and heartbeat'})")
        return who

    def _check_scope(self, name: str, request: Any, who: Principal) -> None:
        """A tenant's client may only name keys of its tenant (which the SDK prepends)."""
        scope = who.scope
        if not scope or name not in KEYED:
            return
        bad = next((k for k in KEYED[name](request) if not k.startswith(scope)), None)
        if bad is not None:
            raise _Reject(grpc.StatusCode.PERMISSION_DENIED,
                          f"{name}: key {bad[:40]!r} is outside tenant {who.tenant!r} (keys of this "
                          f"credential start with {scope!r}; the SDK adds it)")

    def _limits(self) -> tuple[Principal, TenantLimits] | None:
        """The caller's tenant and its quotas, for a tenant's client with any."""
        who = self._caller
        if who is None or self.credentials is None or not who.scope:
            return None
        limits = self.credentials.limits.get(who.tenant)
        return None if limits is None else (who, limits)

    def _check_quota(self, req: pb.PutStartRequest) -> None:
        """A tenant's keys may hold at most its quota (bytes of complete objects, counted
        once whatever the replicas): RESOURCE_EXHAUSTED (the client's NoSpace) beyond it.
        And at most ``max_puts_in_flight`` of them may be reserved by puts not yet ended:
        RESOURCE_EXHAUSTED (the client's TryAgain) beyond it."""
        mine = self._limits()
        if mine is None:
            return
        who, limits = mine
        if limits.quota_bytes is not None:
            held = self.state.scope_bytes(who.scope)
            asked = sum(i.size for i in req.items)
            if held + asked > limits.quota_bytes:
                raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{NO_SPACE_MARKER} tenant {who.tenant!r} holds {held} bytes of its quota of "
                              f"{limits.quota_bytes}; this put needs {asked} more (remove keys, or raise quota_bytes)")
        if limits.max_puts_in_flight is not None:
            if len(req.items) > limits.max_puts_in_flight:  # never fits: not worth a retry
                raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"PutStart of {len(req.items)} keys exceeds tenant {who.tenant!r}'s "
                              f"max_puts_in_flight={limits.max_puts_in_flight}: split the batch")
            pending = self.state.scope_pending(who.scope)
            if pending + len(req.items) > limits.max_puts_in_flight:
                raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"{BUSY_MARKER} tenant {who.tenant!r} has {pending} keys in puts not yet ended, "
                              f"{len(req.items)} more would pass its max_puts_in_flight="
                              f"{limits.max_puts_in_flight}; retry when they end")

    def _check_pins(self, keys: Sequence[bytes]) -> None:
        """A tenant may pin at most ``max_pins`` of its keys: RESOURCE_EXHAUSTED (the
        client's NoSpace) for a Pin that would go beyond."""
        mine = self._limits()
        if mine is None or mine[1].max_pins is None:
            return
        who, limit = mine[0], mine[1].max_pins
        new = len({k for k in keys if self.state.pinned_version(k) is None})
        pinned = self.state.scope_pins(who.scope)
        if new and pinned + new > limit:
            raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{NO_SPACE_MARKER} tenant {who.tenant!r} has {pinned} keys pinned, {new} more would "
                          f"pass its max_pins={limit} (unpin some, or raise max_pins)")

    def _auth_mtime(self) -> float:
        if self.config.auth_dir is None:
            return 0.0
        try:
            return (Path(self.config.auth_dir) / CREDENTIALS).stat().st_mtime
        except OSError:
            return 0.0

    def _reload_credentials(self) -> None:
        """Pick up tenants added while running (``kvstore auth add-tenant``)."""
        if self.config.auth_dir is None or self.credentials is None:
            return
        mtime = self._auth_mtime()
        if mtime == self._credentials_mtime:
            return
        try:
            self.credentials = Credentials.load(self.config.auth_dir)
        except ConfigError as e:
            log.error("keeping the previous credentials: %s", e)
        else:
            log.info("credentials reloaded from %s: %d entries", self.config.auth_dir,
                     len(self.credentials.entries))
        self._credentials_mtime = mtime

    def _auth_fields(self, known_version: str | None) -> dict[str, Any]:
        """The client-token digests a node must accept (when its copy is not current)."""
        if self.credentials is None:
            return {}
        version = self.credentials.version
        if known_version == version:
            return {"auth_version": version}
        return {"auth_version": version, "client_digests": self.credentials.client_digests(),
                "client_scopes": self.credentials.client_scopes(), "grant_key": self.grant_key}

    def lead(self, state: MasterState, warmup: float, pins: dict[bytes, int] | None = None) -> None:
        """Serve ``state`` (this master just won the election); clients wait ``warmup``
        seconds while the nodes re-register; ``pins`` (from etcd: key -> checksum) are
        pinned again as the nodes re-register those versions.

        The table starts empty and is rebuilt from the nodes' registrations, the source of
        truth: this master's own journal may be from an earlier term, and trusting it would
        make a re-registering node drop newer versions of keys that changed since (seen in
        the chaos harness with disk tiers). Only its counters are kept, so epochs and ids
        keep growing; its stale object and node records are deleted."""
        if self.store is not None:
            records = list(self.store.load())
            counters = [(k, v) for k, v in records if k in (codec.META_EPOCH, codec.META_GEN)]
            self.store.write([(k, None) for k, _ in records if k not in (codec.META_EPOCH, codec.META_GEN)])
            state.restore(counters, self.clock())
        state.take_events()  # restoring is not news
        state.pins_to_restore = dict(pins or {})
        self.state, self._unwritten = state, []
        self.warm_until = time.monotonic() + warmup
        self.flush()
        self.metrics.update(state.stats(self.clock()))

    def flush(self) -> None:
        """Write the state's journal in one batch (a failed write is retried on the next
        call), then publish the events of what it wrote."""
        events = self.state.take_events()
        records = self._unwritten + self.state.take_journal()
        self._unwritten = []
        try:
            if self.store is not None and records:
                self.store.write(records)
        except KVStoreError:
            self._unwritten = records
            raise
        finally:
            self.events.add(events, self.clock())

    def _batch(self, n: int, what: str) -> None:
        if n > self.config.max_batch:
            raise _Reject(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{what}: {n} items exceed master.max_batch={self.config.max_batch}; "
                          "split the request into smaller batches")

    def _keys(self, keys: Sequence[bytes], what: str, batch: bool = True) -> None:
        if batch:
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
        # held is bounded by the message size only: a node may hold millions of chunks
        self._keys([h.key for h in req.held], "RegisterNode.held", batch=False)
        if len(req.endpoints) > 64 or len(req.tiers) > 64:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                          "RegisterNode: at most 64 endpoints and 64 tiers")
        r = self.state.register_node(self.clock(), req.node_id, req.host, req.control_address,
                                     endpoints_in(req.endpoints), tiers_in(req.tiers),
                                     held_in(req.held), complete=not req.more_held)
        if r.drop:
            log.info("node %s registered (epoch %d), told to drop %d stale keys",
                     req.node_id, r.epoch, len(r.drop))
        return pb.RegisterNodeResponse(epoch=r.epoch, heartbeat_interval_ms=r.heartbeat_interval_ms,
                                       node_ttl_ms=r.node_ttl_ms, drop=r.drop, **self._auth_fields(None))

    def _ReportHeld(self, req: pb.ReportHeldRequest) -> pb.ReportHeldResponse:
        self._node_id(req.node_id)
        self._keys([h.key for h in req.held], "ReportHeld.held", batch=False)
        rereg, drop = self.state.report_held(self.clock(), req.node_id, req.epoch, held_in(req.held), req.last)
        return pb.ReportHeldResponse(reregister=rereg, drop=drop)

    def _Heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        self._node_id(req.node_id)
        self._keys(req.lost, "Heartbeat.lost")
        r = self.state.heartbeat(self.clock(), req.node_id, req.epoch, tiers_in(req.tiers),
                                 list(req.lost))
        return pb.HeartbeatResponse(reregister=r.reregister, remove=r.remove,
                                    **self._auth_fields(req.auth_version))

    def _PutStart(self, req: pb.PutStartRequest) -> pb.PutStartResponse:
        self._keys([i.key for i in req.items], "PutStart")
        if req.replicas > self.config.max_replicas:
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                          f"PutStart: replicas={req.replicas} exceeds master.max_replicas="
                          f"{self.config.max_replicas}")
        self._check_quota(req)
        r = self.state.put_start(self.clock(), items_in(req.items), req.replicas, req.client_host)
        resp = put_start_out(r)
        if self.credentials is not None:  # secured nodes store only what the master placed there
            for item, p in zip(req.items, resp.placements, strict=True):
                if p.status == pb.OK:
                    p.grants.extend(write_grant(self.grant_key, n.node_id, item.key, item.size, item.checksum,
                                                r.expires_ms) for n in p.nodes)
        return resp

    def _PutEnd(self, req: pb.PutEndRequest) -> pb.PutEndResponse:
        self._keys(req.keys, "PutEnd")
        if req.checksums and len(req.checksums) != len(req.keys):
            raise _Reject(grpc.StatusCode.INVALID_ARGUMENT,
                          f"PutEnd: {len(req.checksums)} checksums for {len(req.keys)} keys")
        return pb.PutEndResponse(statuses=statuses_out(
            self.state.put_end(self.clock(), req.put_id, req.keys, list(req.checksums) or None)))

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

    def _ReportBad(self, req: pb.ReportBadRequest) -> pb.ReportBadResponse:
        self._keys([i.key for i in req.items], "ReportBad")
        for i in req.items:
            self._node_id(i.node_id)
        st = self.state.report_bad(self.clock(), [(i.key, i.node_id, i.checksum) for i in req.items])
        for i, s in zip(req.items, st, strict=True):
            if s == Status.OK:
                log.warning("replica of %s on node %s failed a client's verification: dropped",
                            i.key[:16].hex(), i.node_id)
        return pb.ReportBadResponse(statuses=statuses_out(st))

    def _Pin(self, req: pb.PinRequest) -> pb.PinResponse:
        self._keys(req.keys, "Pin")
        self._check_pins(req.keys)
        st = self.state.pin(self.clock(), req.keys)
        self._pin_changes += [(k, self.state.pinned_version(k)) for k, s in zip(req.keys, st, strict=True)
                              if s == Status.OK]
        return pb.PinResponse(statuses=statuses_out(st))

    def _Unpin(self, req: pb.PinRequest) -> pb.PinResponse:
        self._keys(req.keys, "Unpin")
        st = self.state.unpin(self.clock(), req.keys)
        # also a pin read from etcd whose version has not re-registered yet
        self._pin_changes += [(k, None) for k, s in zip(req.keys, st, strict=True)
                              if s == Status.OK or self.state.pins_to_restore.pop(k, None) is not None]
        return pb.PinResponse(statuses=statuses_out(st))

    def _Stats(self, req: pb.StatsRequest) -> pb.StatsResponse:
        resp = stats_out(self.state.stats(self.clock()))
        if self._caller is not None and self._caller.scope:  # a tenant sees its own objects only
            scope = self._caller.scope
            resp.objects, resp.bytes = self.state.scope_objects(scope), self.state.scope_bytes(scope)
            resp.pending = resp.leases = resp.pins = 0
            resp.counters.clear()
        return resp

    def _Hello(self, req: pb.HelloRequest) -> pb.HelloResponse:
        return pb.HelloResponse(fast_address=self.fast_address,
                                key_prefix=self._caller.scope if self._caller is not None else b"")

    # -- periodic ---------------------------------------------------------------

    def tick(self) -> None:
        """Expire what is due, persist, refresh metrics. Logs; raises only KVStoreError."""
        self._reload_credentials()
        if self.leading is not None and not self.leading():
            return  # a standby's (or deposed leader's) table is not the pool's
        now = self.clock()
        r = self.state.tick(now)
        if self.state.counters["pauses"] != self._pauses_logged:
            self._pauses_logged = self.state.counters["pauses"]
            log.warning("master was not running for %.1fs (paused or starved): every node gets a fresh "
                        "%.1fs to heartbeat before any is declared dead", self.state.paused_ms / 1000,
                        self.state.node_ttl_ms / 1000)
        for nid in r.dead_nodes:
            log.warning("node %s missed its heartbeats for %.1fs: dead, its replicas are gone",
                        nid, self.state.node_ttl_ms / 1000)
        self.flush()
        self.metrics.update(self.state.stats(now))


class EventsServicer(pb_grpc.EventsServicer):  # type: ignore[misc]
    """``Events.Watch``: the master's event log (kvstore.master.events), streamed."""

    def __init__(self, master: MasterServicer) -> None:
        self.master = master

    async def Watch(self, request: pb.WatchRequest, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        m = self.master
        scope = b""
        try:
            if m.credentials is not None:
                scope = m._authorize("Watch", authorization(context)).scope
            if m.leading is not None and not m.leading():
                raise _Reject(grpc.StatusCode.UNAVAILABLE, m.standby_message)
        except _Reject as e:
            await context.abort(e.code, str(e))
        after = m.events.last if request.from_now else request.after

        def visible(e: pb.PoolEvent) -> bool:
            return not scope or not e.key or e.key.startswith(scope)

        def alive() -> bool:
            return not context.done() and (m.leading is None or m.leading())

        async for event in m.events.follow(after, visible, alive):
            yield event
