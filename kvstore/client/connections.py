"""Per-node connections of a client: the node's control channel, and its memory when it
runs on this host.

A client only initiates: it opens no listening socket and starts no server
thread. Every node is reached through its control channel (ALLOCATE/COMMIT,
ACQUIRE/RELEASE, FETCH/STORE, REMOVE; :mod:`kvstore.node.control`). A node on
the same host (same host id) that serves ``shm://`` is also mapped: its arena
and extent-generation table, for one-sided reads and direct writes
(:mod:`kvstore.client.samehost`).
"""

from __future__ import annotations

import logging
import secrets
import ssl
import threading
from dataclasses import dataclass
from typing import Any

from kvstore.client.samehost import MappedNode
from kvstore.errors import KVStoreError
from kvstore.node.control import ControlClient
from kvstore.node.protocol import Maps, Op, SlotStatus
from kvstore.v1 import master_pb2 as mpb
from transport.base import Peer, Transport, TransportOptions
from transport.regions import RemoteRegion
from transport.registry import create

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
    # Reconnect to a restarted master within seconds: gRPC's default back-off grows to
    # minutes, long enough for a node to miss the master's grace period after an outage.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

log = logging.getLogger(__name__)


@dataclass
class NodeConn:
    node_id: str
    epoch: int
    control: Any
    """ControlClient (or AsyncControlClient in an AsyncClient)."""
    peer: Peer | None = None
    """The shm:// connection of a same-host node (keeps its segments mapped)."""
    mapped: MappedNode | None = None
    """The node's arena mapped into this process (same host): one-sided reads, direct writes."""

    def close(self) -> None:
        if self.peer is not None:
            self.peer.close()
        self.control.close()


class Connections:
    """Opens and caches connections to nodes. Thread-safe."""

    def __init__(self, host_id: str, *, same_host: bool, timeout: float, token: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.host_id = host_id
        self.tls = tls
        self.same_host = same_host
        self.timeout = timeout
        self.token = token
        self.session = secrets.token_bytes(16)
        """Named in every connection's AUTH: the node binds this client's handles to it."""
        self._shm: Transport | None = None
        self._conns: dict[tuple[str, int], NodeConn] = {}
        self._lock = threading.Lock()

    def cached(self, node: mpb.NodeInfo) -> NodeConn | None:
        with self._lock:
            conn = self._conns.get((node.node_id, node.epoch))
        return conn if conn is not None and (conn.peer is None or not conn.peer.closed) else None

    def shm_endpoint(self, node: mpb.NodeInfo) -> mpb.Endpoint | None:
        """The node's shm:// endpoint if this client may map its memory (same host)."""
        if not self.same_host or node.host != self.host_id:
            return None
        return next((e for e in node.endpoints if e.scheme == "shm"), None)

    def add(self, conn: NodeConn) -> NodeConn:
        """Keep ``conn`` (closing any earlier connection to that node), or, when another
        thread connected to the same node incarnation meanwhile and that connection is
        alive, keep that one and close ``conn``; the one kept."""
        with self._lock:
            old = self._conns.pop((conn.node_id, conn.epoch), None)
            if old is not None and (old.peer is None or not old.peer.closed):
                self._conns[(conn.node_id, conn.epoch)] = old
                old, conn = conn, old
            else:
                for k in [k for k in self._conns if k[0] == conn.node_id]:
                    self._conns.pop(k).close()
                self._conns[(conn.node_id, conn.epoch)] = conn
        if old is not None:
            old.close()
        return conn

    def _shm_transport(self) -> Transport:
        with self._lock:
            if self._shm is None:
                self._shm = create("shm://", TransportOptions(listen=False))
            return self._shm

    def get(self, node: mpb.NodeInfo) -> NodeConn:
        conn = self.cached(node)
        if conn is not None:
            return conn
        conn = NodeConn(node.node_id, node.epoch, ControlClient(node.control_address, self.timeout,
                                                                token=self.token, session=self.session,
                                                                tls=self.tls))
        ep = self.shm_endpoint(node)
        if ep is not None:
            try:
                info = Maps(*conn.control.call(Op.MAPS, ["shm"], self.timeout)[0])
            except (KVStoreError, TypeError, ValueError) as e:
                log.warning("node %s: same-host memory not mapped (%s); using its control channel", node.node_id, e)
            else:
                self.map(conn, ep, info)
        return self.add(conn)

    def map(self, conn: NodeConn, ep: mpb.Endpoint, info: Maps) -> None:
        """Map the node's arena and generation table (from its MAPS answer); without them
        (logged) every read and write goes through the control channel."""
        if info.status != SlotStatus.OK or info.granule <= 0:
            return
        try:
            t = self._shm_transport()
            conn.peer = t.connect(ep.metadata, timeout=self.timeout)
            arena = t.map_remote(conn.peer, RemoteRegion.from_bytes(ep.region), timeout=self.timeout)
            gens = t.map_remote(conn.peer, RemoteRegion.from_bytes(info.generations), timeout=self.timeout)
            conn.mapped = MappedNode(conn.peer, arena, gens, info.granule)
        except (KVStoreError, OSError, TypeError, ValueError) as e:
            log.warning("node %s: same-host memory not mapped (%s); using its control channel", conn.node_id, e)
            if conn.peer is not None:
                conn.peer.close()
                conn.peer = None

    def drop(self, conn: NodeConn) -> None:
        """Forget a connection that failed (the next call reconnects)."""
        with self._lock:
            if self._conns.get((conn.node_id, conn.epoch)) is conn:
                del self._conns[(conn.node_id, conn.epoch)]
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
            shm, self._shm = self._shm, None
        for c in conns:
            c.close()
        if shm is not None:
            shm.close()
