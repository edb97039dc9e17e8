"""Prometheus metrics of a node, read from the store's own counters at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvstore.node.holds import Holds
from kvstore.store import LocalStore


class NodeCollector(Collector):
    """Exports ``kvstore_node_*`` metrics; nothing is counted twice."""

    def __init__(self, node_id: str, store: LocalStore, holds: Holds, refused_writes: Callable[[], int] | None = None
                 ) -> None:
        self.node_id = node_id
        self.store = store
        self.holds = holds
        self.refused_writes = refused_writes

    def collect(self) -> Iterator[Any]:
        stats = self.store.stats()
        used = GaugeMetricFamily("kvstore_node_tier_used_bytes", "Bytes used per tier", labels=["node", "tier"])
        cap = GaugeMetricFamily("kvstore_node_tier_capacity_bytes", "Capacity per tier", labels=["node", "tier"])
        objs = GaugeMetricFamily("kvstore_node_tier_objects", "Chunks per tier", labels=["node", "tier"])
        for name, t in stats["tiers"].items():
            used.add_metric([self.node_id, name], t["used"])
            cap.add_metric([self.node_id, name], t["capacity"])
            objs.add_metric([self.node_id, name], t["chunks"])
        yield from (used, cap, objs)
        c = stats["counters"]
        hits = CounterMetricFamily("kvstore_node_hits", "Reads served, per tier", labels=["node", "tier"])
        for tier in ("dram", "disk"):
            hits.add_metric([self.node_id, tier], c.get(f"hits.{tier}", 0))
        yield hits
        misses = CounterMetricFamily("kvstore_node_misses", "Reads missed, per reason", labels=["node", "reason"])
        for reason in ("not_found", "corrupt", "no_room"):
            misses.add_metric([self.node_id, reason], c.get(f"misses.{reason}", 0))
        yield misses
        ev = CounterMetricFamily("kvstore_node_evictions", "Chunks evicted, per tier", labels=["node", "tier"])
        for tier in ("dram", "disk"):
            ev.add_metric([self.node_id, tier], c.get(f"evictions.{tier}", 0))
        yield ev
        for name, help_ in (("demotions", "Chunks moved DRAM -> disk"), ("promotions", "Chunks moved disk -> DRAM"),
                            ("puts.dram", "Chunks stored")):
            m = CounterMetricFamily(f"kvstore_node_{name.replace('.', '_')}", help_, labels=["node"])
            m.add_metric([self.node_id], c.get(name, 0))
            yield m
        holds = GaugeMetricFamily("kvstore_node_holds", "Allocations/leases held for clients", labels=["node"])
        holds.add_metric([self.node_id], len(self.holds))
        yield holds
        reaped = CounterMetricFamily("kvstore_node_holds_reclaimed", "Holds reclaimed after their TTL",
                                     labels=["node"])
        reaped.add_metric([self.node_id], self.holds.reaped)
        yield reaped
        if self.refused_writes is not None:
            refused = CounterMetricFamily("kvstore_node_refused_writes",
                                          "STORE/COMMIT items refused for a missing, stale or foreign write grant",
                                          labels=["node"])
            refused.add_metric([self.node_id], self.refused_writes())
            yield refused
