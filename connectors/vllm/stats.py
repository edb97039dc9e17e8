"""The connector's counters in vLLM's own stats: its periodic log line and ``/metrics``.

vLLM asks each side's connector for the stats of the last interval
(``get_kv_connector_stats``), adds the workers' and the scheduler's together
(:meth:`KVStoreConnectorStats.aggregate`), logs the reduction with its other
periodic stats ("KV Transfer metrics: ...") and hands the raw data to
:class:`KVStorePromMetrics`, which counts it into Prometheus counters
``vllm:kvstore_<name>_total`` (one per :data:`EXPORTED` name, with vLLM's
per-engine labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

EXPORTED: dict[str, str] = {
    # scheduler side
    "lookups": "prefix lookups asked of the pool",
    "load_requests": "requests that loaded KV from the pool",
    "load_tokens": "tokens loaded from the pool instead of computed",
    "lookup_errors": "lookups that failed (treated as misses)",
    "lookups_skipped_breaker": "lookups answered as misses because the master is unreachable",
    "refused_requests": "requests neither loaded nor saved (prompt embeddings)",
    "save_chunks": "chunks planned for saving",
    # worker side
    "load_bytes": "bytes of KV written into the engine's cache from the pool",
    "load_chunk_misses": "chunks a load did not find or could not verify (recomputed)",
    "load_error_blocks": "blocks reported to vLLM as failed loads (recomputed)",
    "load_timeouts": "layer loads that overran the forward pass (abandoned)",
    "load_seconds": "seconds spent in loads",
    "load_wait_seconds": "seconds the forward pass waited for layer loads",
    "load_fetch_seconds": "seconds of loads spent reading from the pool (verified copies included)",
    "load_scatter_seconds": "seconds of loads spent scattering staged KV into a device cache",
    "load_jobs": "load jobs (one per step with loads)",
    "saved_chunks": "chunks stored in the pool",
    "saved_bytes": "bytes stored in the pool",
    "save_seconds": "seconds spent in saves",
    "save_jobs": "save jobs",
    "save_failures": "saves that failed",
    "save_dropped_backlog": "chunks not saved because the save backlog was full",
    "save_dropped_shutdown": "chunks not saved because shutdown's flush timed out",
    "save_skipped_breaker": "chunks not saved because the master is unreachable",
}
"""Counter names the connector reports, with their meaning (also the metric help text)."""


@dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """Counter increments of one interval: ``data`` maps :data:`EXPORTED` names to numbers."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVStoreConnectorStats:
        total: dict[str, float] = {}
        for d in (self.data, other.data):
            for k, v in d.items():
                if isinstance(v, (int, float)):
                    total[k] = total.get(k, 0) + v
        return KVStoreConnectorStats(data=total)

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        out: dict[str, int | float] = {k: v for k, v in d.items() if k in EXPORTED and v and
                                       not k.endswith(("_seconds", "_jobs"))}
        for what in ("load", "save"):
            if d.get(f"{what}_jobs"):
                out[f"avg_{what}_ms"] = round(1e3 * d[f"{what}_seconds"] / d[f"{what}_jobs"], 3)
        return out

    def is_empty(self) -> bool:
        return not any(self.data.values())


class Interval:
    """Turns a side's running counters into per-interval increments."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def take(self, counters: dict[str, Any]) -> KVStoreConnectorStats | None:
        delta = {}
        for k in EXPORTED:
            v = counters.get(k, 0)
            if v != self._last.get(k, 0):
                delta[k] = v - self._last.get(k, 0)
                self._last[k] = v
        return KVStoreConnectorStats(data=delta) if delta else None


class KVStorePromMetrics(KVConnectorPromMetrics):
    """Prometheus counters ``vllm:kvstore_<name>_total`` fed from the interval stats."""

    def __init__(self, vllm_config: Any, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)  # type: ignore[arg-type]
        self.counters: dict[str, dict[int, Any]] = {}
        for name, doc in EXPORTED.items():
            metric = self._counter_cls(name=f"vllm:kvstore_{name}", documentation=f"kvstore connector: {doc}",
                                       labelnames=labelnames)
            self.counters[name] = {idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, v in transfer_stats_data.items():
            per_engine = self.counters.get(name)
            if per_engine is not None and engine_idx in per_engine and isinstance(v, (int, float)) and v > 0:
                per_engine[engine_idx].inc(v)
