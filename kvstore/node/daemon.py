"""The store node: owns a LocalStore, serves it over the transfer engine, reports to the master.

One process, three kinds of threads:

* the transports' own serving threads (clients read from / write into the
  node's DRAM arena, which is registered with every transport);
* the control server's threads (allocate/commit/acquire/release, see
  :mod:`kvstore.node.protocol`), one per client connection;
* one heartbeat thread: heartbeats to the master (tier usage, keys lost
  locally), applies its instructions (remove keys), re-registers when the
  master asks (a new epoch; held keys the master does not vouch for are
  dropped, so a node paused past its TTL serves nothing stale), and reclaims
  holds clients abandoned.

The master being down does not stop the node: it keeps serving the clients
that already know it and re-registers when the master returns.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import grpc

from kvstore.auth import digest
from kvstore.auth import scope_of as tenant_scope
from kvstore.config import NodeConfig, StoreConfig
from kvstore.errors import ConfigError, KVStoreError
from kvstore.hostid import host_id, is_loopback
from kvstore.master.discovery import LeaderWatch, MasterLink
from kvstore.memory.arena import generation_table_bytes
from kvstore.node.control import ControlServer
from kvstore.node.holds import Holds
from kvstore.node.service import RPC_SECONDS, GrantCheck, NodeService
from kvstore.store import LocalStore
from kvstore.tls import ClientTLS, identity_of, server_context
from kvstore.v1 import master_pb2 as mpb
from transport.base import Transport, TransportOptions
from transport.regions import Region
from transport.registry import create

log = logging.getLogger(__name__)

LOST_PAGE = 8192
"""Most lost keys one heartbeat reports; the rest go with the next ones."""
HELD_PAGE = 200_000
# Transports that check their peers: shm:// (same uid only, SO_PEERCRED) and tcp:// (the token).
AUTHENTICATED_SCHEMES = ("shm", "tcp")
"""Held keys per registration message (~10 MiB); more go in ReportHeld pages."""

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    # Reconnect to a restarted master within seconds: gRPC's default back-off grows to
    # minutes, long enough for a node to miss the master's grace period after an outage.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def _transport_uri(uri: str, host: str) -> str:
    """``tcp://`` -> ``tcp://HOST:0``: bare network schemes bind the node's address."""
    scheme, _, rest = uri.partition("://")
    if not rest and scheme in ("tcp", "ucx"):
        return f"{scheme}://{host}:0"
    return uri


class StoreNode:
    """A running node. ``start()`` returns once it serves and registered (or tried to)."""

    def __init__(self, node: NodeConfig, store: StoreConfig, *, token: str | None = None) -> None:
        if store.hbm:
            raise ConfigError("store.hbm: the node daemon has no HBM tier yet (planned: docs/gpu.md); "
                              "an embedded LocalStore has one")
        self.cfg = node
        self.token = token
        protect(node, token)
        # digest -> key scope of the tokens this node's listeners accept: its own until the
        # master sends the set of client tokens (RegisterNode / Heartbeat replies)
        self._digests: dict[str, bytes] = {digest(token): b""} if token else {}
        self._auth_version = ""
        self.host_id = node.host_id or host_id()
        # with a token, tcp:// peers must present one this node accepts (shm:// checks uids)
        tls = server_context(node.tls_cert, node.tls_key, node.tls_client_ca) if node.tls_cert is not None and node.tls_key is not None \
            else None
        opts = TransportOptions(authorize=self.authorize_raw if token else None, tls_server=tls,
                                max_connections=node.max_connections)
        self.transports: list[Transport] = [create(_transport_uri(u, node.host), opts) for u in node.transports]
        # The arena lives in the memory the first same-host transport serves best
        # (a shared segment peers map): same-host clients then copy straight from it.
        # Beside it, the arena's extent-generation table, which same-host clients map to
        # read chunks one-sided (docs/design/hot-path.md).
        shared = next((t for t in self.transports if t.capabilities.mappable), None)
        self._arena_region = shared.allocate(store.dram, name="arena") if shared is not None else None
        self._gens_region = shared.allocate(generation_table_bytes(store.dram, store.alignment),
                                            name="generations") if shared is not None else None
        self.store = LocalStore(store, arena_buffer=_obj(self._arena_region),
                                generations_buffer=_obj(self._gens_region))
        self.regions = {}
        for t in self.transports:
            if t is shared and self._arena_region is not None:
                self.regions[t.scheme] = self._arena_region
            else:
                self.regions[t.scheme] = t.register(self.store.arena.buffer, name="arena")
        self.holds = Holds(node.hold_ttl, per_owner=node.max_holds)
        maps = {shared.scheme: self._gens_region.remote().to_bytes()} \
            if shared is not None and self._gens_region is not None else {}
        self.service = NodeService(self.store, self.holds, maps, require_grants=bool(token),
                                   busy_backoff=node.busy_backoff)
        self._control = ControlServer(node.host, node.control_port, self.service.handle,
                                      authorize=self.scope_of if token else None,
                                      max_connections=node.max_connections, idle_timeout=node.idle_timeout,
                                      tls=tls)
        self.control_address = self._control.address
        self.control_port = int(self.control_address.rpartition(":")[2])
        self.node_id = node.node_id or f"{socket.gethostname()}-{self.control_port}"
        # host:port, or etcd://.../CLUSTER: the leader of a cluster of masters, followed on failover
        # to the master: verified against tls_ca, presenting the node's own certificate
        # (a master with tls_client_ca asks for one)
        self._link = MasterLink(node.master, GRPC_OPTIONS,
                                tls=ClientTLS.of(node.tls_ca, node.tls_cert if node.tls_ca else None,
                                                 node.tls_key if node.tls_ca else None))
        self._leader_changed = threading.Event()
        self._inflight: Any = None
        self._watch = LeaderWatch(self._link.address.target, self._on_new_leader) \
            if self._link.address.target is not None else None
        self.epoch = 0
        self.heartbeat_interval = 1.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="node-heartbeat", daemon=True)
        self.registered = threading.Event()
        self.metrics_port = 0
        self._metrics_server: Any = None
        if node.metrics_port >= 0:
            self._start_metrics(node.metrics_port)

    def _start_metrics(self, port: int) -> None:
        from prometheus_client import start_http_server
        from prometheus_client.registry import CollectorRegistry

        from kvstore.node.metrics import NodeCollector

        registry = CollectorRegistry()
        registry.register(NodeCollector(self.node_id, self.store, self.holds, lambda: self.service.refused_writes))
        registry.register(RPC_SECONDS)
        self._metrics_server, thread = start_http_server(port, addr=self.cfg.host, registry=registry)
        self.metrics_port = self._metrics_server.server_port

    # -- lifecycle -------------------------------------------------------------

    def start(self, register_timeout: float = 10.0) -> StoreNode:
        if self._watch is not None:
            self._watch.start()
        self._thread.start()
        if not self.registered.wait(register_timeout):
            log.warning("node %s: master %s not reachable yet; still trying", self.node_id, self.cfg.master)
        return self

    def stop(self) -> None:
        """Stop serving and heartbeating; release every hold and the store. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
        self._control.close()
        self._thread.join(timeout=5)
        self._link.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        self.holds.close()
        for t in self.transports:
            t.close()
        self.store.close()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    # -- master protocol --------------------------------------------------------

    def scope_of(self, token: bytes | None, peer_cert: bytes | None = None) -> bytes | None:
        """The key scope of a peer presenting ``token`` on the control channel (b"": any
        key), or None if this node does not accept it. Without a token, the identity its
        verified TLS client certificate names (mutual TLS): an admin, or a client of a
        tenant the master's credentials hold (kvstore.tls)."""
        if token:
            return self._digests.get(digest(token))
        who = identity_of(peer_cert) if peer_cert else None
        if who is None:
            return None
        if who.role == "admin":
            return b""
        scope = tenant_scope(who.tenant)
        return scope if scope in self._digests.values() else None

    def authorize_raw(self, token: bytes | None) -> bool:
        """``tcp://`` reaches arena offsets, not keys: unscoped credentials only (admins)."""
        return bool(token) and self.scope_of(token) == b""

    def _take_digests(self, version: str, digests: list[str], scopes: list[bytes], grant_key: bytes = b"") -> None:
        if grant_key and (self.service.grants is None or self.service.grants.secret != grant_key):
            self.service.grants = GrantCheck(grant_key, self.node_id)
            log.info("node %s: storing values only with write grants of this master", self.node_id)
        if version and digests:
            self._digests = dict(zip(digests, scopes or [b""] * len(digests), strict=True))
            if version != self._auth_version:
                log.info("node %s: %d client credentials accepted (version %s)", self.node_id,
                         len(digests), version)
            self._auth_version = version

    def _metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def _tiers(self) -> list[mpb.TierCapacity]:
        return [mpb.TierCapacity(name=name, capacity=t["capacity"], used=t["used"])
                for name, t in self.store.stats()["tiers"].items()]

    def _endpoints(self) -> list[mpb.Endpoint]:
        return [mpb.Endpoint(scheme=t.scheme, metadata=t.metadata(),
                             region=self.regions[t.scheme].remote().to_bytes())
                for t in self.transports]

    def _register(self) -> None:
        held = [mpb.HeldKey(key=k, size=n, checksum=c) for k, n, c in self.store.entries()]
        pages = [held[i:i + HELD_PAGE] for i in range(0, len(held), HELD_PAGE)] or [[]]
        lost = self.store.take_lost()  # the registration tells the master the full truth
        req = mpb.RegisterNodeRequest(node_id=self.node_id, host=self.host_id,
                                      control_address=self.control_address, endpoints=self._endpoints(),
                                      tiers=self._tiers(), held=pages[0], more_held=len(pages) > 1)
        try:
            resp = self._rpc("RegisterNode", req, 10)
            drop = list(resp.drop)
            for i, page in enumerate(pages[1:], 2):  # a node may hold millions of chunks
                more = self._rpc("ReportHeld", mpb.ReportHeldRequest(
                    node_id=self.node_id, epoch=resp.epoch, held=page, last=i == len(pages)), 10)
                if more.reregister:
                    raise KVStoreError("the master restarted the registration")
                drop += more.drop
        except (grpc.RpcError, KVStoreError):
            self.store.return_lost(lost)
            raise
        for key in drop:
            self.store.remove(key)
        self.epoch = resp.epoch
        self._take_digests(resp.auth_version, list(resp.client_digests), list(resp.client_scopes), resp.grant_key)
        # grants are required where the master signs them (it does when it authenticates)
        self.service.require_grants = bool(self.token) and bool(resp.grant_key)
        if resp.heartbeat_interval_ms > 0:
            self.heartbeat_interval = resp.heartbeat_interval_ms / 1000
        log.info("node %s registered: epoch %d, %d held (%d page(s)), %d dropped", self.node_id, self.epoch,
                 len(held), len(pages), len(drop))
        self.registered.set()

    def _heartbeat(self) -> None:
        lost = self.store.take_lost()
        if len(lost) > LOST_PAGE:  # the master takes at most master.max_batch keys per call
            self.store.return_lost(lost[LOST_PAGE:])
            lost = lost[:LOST_PAGE]
        req = mpb.HeartbeatRequest(node_id=self.node_id, epoch=self.epoch, tiers=self._tiers(), lost=lost,
                                   auth_version=self._auth_version)
        try:
            resp = self._rpc("Heartbeat", req, max(self.heartbeat_interval, 2.0))
        except (grpc.RpcError, KVStoreError):
            self.store.return_lost(lost)  # report them next time
            raise
        self._take_digests(resp.auth_version, list(resp.client_digests), list(resp.client_scopes), resp.grant_key)
        if resp.reregister:
            self._register()
            return
        for key in resp.remove:
            self.store.remove(key)

    def _rpc(self, method: str, req: Any, timeout: float) -> Any:
        """One call to the master; abandoned at once if the cluster's leader changes meanwhile
        (a paused leader would otherwise hold the node for the whole timeout)."""
        fut = getattr(self._link.stub(timeout), method).future(req, timeout=timeout, metadata=self._metadata())
        self._inflight = fut
        try:
            return fut.result()
        except grpc.FutureCancelledError as e:
            raise KVStoreError(f"{method} abandoned: the cluster's leader changed") from e
        finally:
            self._inflight = None

    def _on_new_leader(self) -> None:
        self._link.failed()
        self._leader_changed.set()
        fut = self._inflight
        if fut is not None:
            fut.cancel()

    def _loop(self) -> None:
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._leader_changed.is_set():  # a cluster's new leader: heartbeat to it now
                self._leader_changed.clear()
                next_beat = 0.0
            if now >= next_beat:
                try:
                    if not self.registered.is_set() or self.epoch == 0:
                        self._register()
                    else:
                        self._heartbeat()
                except grpc.RpcError as e:
                    log.warning("node %s: master %s: %s", self.node_id, self._link.dialed, _rpc_text(e))
                    self._link.failed()  # a cluster's leader may have changed: ask etcd again
                except KVStoreError as e:
                    log.warning("node %s: master %s: %s", self.node_id, self._link.dialed, e)
                    self._link.failed()
                next_beat = now + self.heartbeat_interval
            self.holds.reap()
            self._stop.wait(min(0.2, self.heartbeat_interval))


def protect(node: NodeConfig, token: str | None) -> None:
    """Protected mode: a node reachable from other hosts must require a token (unless
    ``node.insecure``), and may then serve only transports that check it."""
    if token is None:
        if not node.insecure and not is_loopback(node.host):
            raise ConfigError(
                f"node: refusing to serve {node.host} without authentication: anyone on the network could "
                "read and overwrite the arena. Give the node a token (--token-file: the master's shared "
                "token or node.token from `kvstore auth init`), bind 127.0.0.1, or set node.insecure = true.")
        return
    open_ = [u for u in node.transports if u.partition("://")[0] not in AUTHENTICATED_SCHEMES]
    if open_ and not node.insecure:
        raise ConfigError(f"node: {', '.join(open_)} cannot check tokens yet, so a node with a token does "
                          f"not serve it (it would expose the arena); serve {', '.join(AUTHENTICATED_SCHEMES)} "
                          "only, or set node.insecure = true")


def _obj(region: Region | None) -> Any:
    return region.obj if region is not None else None


def _rpc_text(e: Any) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return f"{code.name if code else 'error'}: {details}"
