"""Prometheus metrics of the master (``/metrics`` over HTTP, prometheus-client).

State gauges and counters are read from a snapshot the servicer refreshes on
its event loop (every tick), so the HTTP thread never touches the live state.
RPC latencies are observed directly (prometheus-client metrics are thread-safe).
Each :class:`MasterMetrics` has its own registry: several masters can live in
one process (tests, ``kvstore up``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvstore.master.types import Stats

PREFIX = "kvstore_master"


@dataclass(frozen=True)
class _Snapshot:
    gauges: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    nodes: list[tuple[str, str, int, int]] = field(default_factory=list)  # node, tier, cap, used
    assigned: list[tuple[str, int, int]] = field(default_factory=list)  # node, bytes, objects


class _StateCollector(Collector):
    def __init__(self) -> None:
        self.snapshot = _Snapshot()

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot  # one atomic read; the loop swaps in a new object
        for name, value in s.gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", _GAUGE_HELP[name], value=value)
        for name, value in s.counters.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", f"State counter {name}.", value=value)
        cap = GaugeMetricFamily(f"{PREFIX}_node_capacity_bytes",
                                "Tier capacity a node reports.", labels=["node", "tier"])
        used = GaugeMetricFamily(f"{PREFIX}_node_used_bytes",
                                 "Tier bytes in use a node reports.", labels=["node", "tier"])
        for node, tier, c, u in s.nodes:
            cap.add_metric([node, tier], c)
            used.add_metric([node, tier], u)
        assigned = GaugeMetricFamily(f"{PREFIX}_node_assigned_bytes",
                                     "Bytes the master has placed on a node.", labels=["node"])
        objects = GaugeMetricFamily(f"{PREFIX}_node_objects",
                                    "Complete replicas the master places on a node.",
                                    labels=["node"])
        for node, b, n in s.assigned:
            assigned.add_metric([node], b)
            objects.add_metric([node], n)
        yield from (cap, used, assigned, objects)


_GAUGE_HELP = {
    "objects": "Complete objects (keys with at least one replica).",
    "pending_keys": "Keys reserved by PutStart and not yet ended.",
    "bytes": "Bytes of complete objects (one replica each).",
    "nodes": "Live nodes.",
    "leases": "Read leases held.",
    "pins": "Pinned objects.",
}


class MasterMetrics:
    """The master's metrics registry; :meth:`serve` exposes it on HTTP ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._state = _StateCollector()
        self.registry.register(self._state)
        self.rpc_seconds = Histogram(
            f"{PREFIX}_rpc_seconds", "Master RPC latency by method.", ["method"],
            registry=self.registry,
            buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0))
        self.rpc_errors = Counter(
            f"{PREFIX}_rpc_errors", "Master RPCs that failed, by method and status code.",
            ["method", "code"], registry=self.registry)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def update(self, stats: Stats) -> None:
        """Refresh the state snapshot (call on the loop that owns the state)."""
        self._state.snapshot = _Snapshot(
            gauges={"objects": stats.objects, "pending_keys": stats.pending,
                    "bytes": stats.bytes, "nodes": len(stats.nodes),
                    "leases": stats.leases, "pins": stats.pins},
            counters={k: float(v) for k, v in stats.counters.items()},
            nodes=[(n.node_id, t.name, t.capacity, t.used) for n in stats.nodes for t in n.tiers],
            assigned=[(n.node_id, n.assigned_bytes, n.objects) for n in stats.nodes],
        )

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a daemon thread; returns the bound port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint; idempotent."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
