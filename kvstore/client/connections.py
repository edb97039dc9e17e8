"""Per-node connections of a client: control stub + transfer-engine peer, picked by capability."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from kvstore.client.samehost import MappedNode
from kvstore.errors import KVStoreError, TransportError
from kvstore.node.control import ControlClient
from kvstore.node.protocol import Maps, Op, SlotStatus
from kvstore.v1 import master_pb2 as mpb
from transport.base import Peer, Transport
from transport.regions import RemoteRegion
from transport.registry import create

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]


@dataclass
class NodeConn:
    node_id: str
    epoch: int
    scheme: str
    transport: Transport
    peer: Peer
    region: RemoteRegion
    control: ControlClient
    mapped: MappedNode | None = None
    """The node's arena mapped into this process (same host): one-sided reads."""

    def close(self) -> None:
        self.peer.close()
        self.control.close()


class Connections:
    """Opens and caches connections to nodes. Thread-safe.

    Endpoint choice: ``shm`` when the node runs on this host (same host id) and
    the same-host path is enabled, otherwise the first of ``prefer`` the node
    serves (default ``ucx`` then ``tcp``; ucx only when installed).
    """

    def __init__(self, host_id: str, *, same_host: bool, prefer: tuple[str, ...], timeout: float) -> None:
        self.host_id = host_id
        self.same_host = same_host
        self.prefer = prefer
        self.timeout = timeout
        self._transports: dict[str, Transport] = {}
        self._conns: dict[tuple[str, int], NodeConn] = {}
        self._lock = threading.Lock()

    def transport(self, scheme: str) -> Transport:
        with self._lock:
            t = self._transports.get(scheme)
            if t is None:
                uri = f"{scheme}://127.0.0.1:0" if scheme in ("tcp", "ucx") else f"{scheme}://"
                t = self._transports[scheme] = create(uri)
            return t

    def choose(self, node: mpb.NodeInfo) -> mpb.Endpoint:
        by_scheme = {e.scheme: e for e in node.endpoints}
        order = list(self.prefer)
        if self.same_host and node.host == self.host_id:
            order.insert(0, "shm")
        else:
            order = [s for s in order if s != "shm"]
        for scheme in order:
            if scheme in by_scheme:
                ep: mpb.Endpoint = by_scheme[scheme]
                return ep
        raise TransportError(
            f"node {node.node_id} serves {sorted(by_scheme)}, none usable from here (tried {order})"
        )

    def get(self, node: mpb.NodeInfo) -> NodeConn:
        key = (node.node_id, node.epoch)
        with self._lock:
            conn = self._conns.get(key)
        if conn is not None and not conn.peer.closed:
            return conn
        ep = self.choose(node)
        t = self.transport(ep.scheme)
        try:
            peer = t.connect(ep.metadata, timeout=self.timeout)
        except OSError as e:
            raise TransportError(f"connect to node {node.node_id} over {ep.scheme}: {e}") from e
        conn = NodeConn(node.node_id, node.epoch, ep.scheme, t, peer, RemoteRegion.from_bytes(ep.region),
                        ControlClient(node.control_address, self.timeout))
        if t.capabilities.mappable:
            conn.mapped = self._map(conn)
        with self._lock:
            old = self._conns.pop(key, None)
            # Drop connections to earlier epochs of this node.
            for k in [k for k in self._conns if k[0] == node.node_id]:
                self._conns.pop(k).close()
            self._conns[key] = conn
        if old is not None:
            old.close()
        return conn

    def _map(self, conn: NodeConn) -> MappedNode | None:
        """Map the node's arena and generation table; ``None`` (leased reads only) if it can't."""
        try:
            info = Maps(*conn.control.call(Op.MAPS, [conn.scheme], self.timeout)[0])
            if info.status != SlotStatus.OK or info.granule <= 0:
                return None
            gens = RemoteRegion.from_bytes(info.generations)
            return MappedNode(conn.peer, conn.transport.map_remote(conn.peer, conn.region, timeout=self.timeout),
                              conn.transport.map_remote(conn.peer, gens, timeout=self.timeout), info.granule)
        except (KVStoreError, OSError, TypeError, ValueError) as e:
            log.warning("node %s: no one-sided reads (%s); every read takes a lease", conn.node_id, e)
            return None

    def drop(self, conn: NodeConn) -> None:
        """Forget a connection that failed (the next call reconnects)."""
        with self._lock:
            if self._conns.get((conn.node_id, conn.epoch)) is conn:
                del self._conns[(conn.node_id, conn.epoch)]
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
            transports, self._transports = list(self._transports.values()), {}
        for c in conns:
            c.close()
        for t in transports:
            t.close()
