"""``KVStoreConnector``: vLLM's v1 KV connector backed by the kvstore pool.

Load it unchanged with::

    kv_transfer_config={"kv_connector": "KVStoreConnector",
                        "kv_connector_module_path": "connectors.vllm",
                        "kv_role": "kv_both",            # or kv_producer / kv_consumer
                        "kv_load_failure_policy": "recompute",
                        "kv_connector_extra_config": {"master": "127.0.0.1:5555"}}

vLLM builds one instance per role; this class only dispatches to
:class:`~connectors.vllm.scheduler.SchedulerSide` (scheduler process) or
:class:`~connectors.vllm.worker.WorkerSide` (each worker). Who calls what:

==================================  =========  ===========================================
method                              side       contract
==================================  =========  ===========================================
get_num_new_matched_tokens          scheduler  prefix hit beyond local tokens; no side effects
update_state_after_alloc            scheduler  plan the load into the allocated blocks
build_connector_meta                scheduler  the step's loads and saves (resets loads)
request_finished                    scheduler  True keeps blocks until the saves are done
update_connector_output             scheduler  the workers' pool events of the step
take_events                         scheduler  pool events for vLLM's KV-event publisher
set_xfer_handshake_metadata         scheduler  workers' namespaces, once at start-up
register_kv_caches                  worker     derive layout from shapes/strides, once
get_handshake_metadata              worker     this worker's namespace, once
start_load_kv                       worker     start the step's loads; never blocks
wait_for_layer_load                 worker     block for one layer's sync loads
save_kv_layer                       worker     gather one layer of chunks to save (memcpy)
wait_for_save                       worker     settle loads, queue saves; no store I/O
get_finished                        worker     saves done for finished requests; async loads
get_block_ids_with_load_errors      worker     blocks to recompute
get_kv_connector_kv_cache_events    worker     chunks stored to / loaded from the pool
==================================  =========  ===========================================

Roles: ``kv_both`` loads and saves (prefix sharing / offload), ``kv_producer``
saves only, ``kv_consumer`` loads only. Hooks accept ``**kwargs``: the vLLM API
is experimental and grows arguments.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from connectors.vllm.config import ConnectorConfig
from connectors.vllm.metadata import KVStoreConnectorMetadata
from connectors.vllm.naming import model_identity
from connectors.vllm.scheduler import SchedulerSide
from connectors.vllm.stats import Interval, KVStoreConnectorStats, KVStorePromMetrics
from connectors.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch
    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent, KVConnectorKVEvents
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorPromMetrics,
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

_ROLES = {"kv_both": (True, True), "kv_producer": (False, True), "kv_consumer": (True, False)}


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM KV connector over kvstore. See the module docstring for the method table."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None, **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, role=role,
                         kv_cache_config=kv_cache_config)  # type: ignore[arg-type]  # None before vLLM 0.31
        ktc = self._kv_transfer_config
        self.cfg = ConnectorConfig.from_extra(ktc.kv_connector_extra_config)
        block_size = vllm_config.cache_config.block_size
        self.cfg.check_block_size(block_size)
        if ktc.kv_role not in _ROLES:
            raise ValueError(f"kvstore connector: kv_role must be one of {sorted(_ROLES)}, got {ktc.kv_role!r}")
        load, save = _ROLES[ktc.kv_role]
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        self._interval = Interval()
        kec = getattr(vllm_config, "kv_events_config", None)
        events = bool(kec is not None and kec.enable_kv_cache_events)
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = SchedulerSide(self.cfg, block_size, load=load, save=save, events=events)
        else:
            mc, pc = vllm_config.model_config, vllm_config.parallel_config
            self.worker = WorkerSide(
                self.cfg, model_id=self.cfg.model_id or str(mc.model), block_size=block_size,
                kv_heads=mc.get_num_kv_heads(pc), head_dim=mc.get_head_size(), tp_rank=0,
                tp_size=pc.tensor_parallel_size, load=load, save=save, identity=model_identity(vllm_config),
                pp_size=pc.pipeline_parallel_size, use_mla=bool(getattr(mc, "use_mla", False)),
                events=events)

    # -- worker side -------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor], **kwargs: Any) -> None:
        assert self.worker is not None
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self.worker.tp_rank = get_tensor_model_parallel_rank()
        except (AssertionError, ImportError):  # no TP group in this process: rank 0
            self.worker.tp_rank = 0
        try:
            from vllm.distributed.parallel_state import get_pp_group

            self.worker.pp_rank = get_pp_group().rank_in_group
        except (AssertionError, ImportError):  # no PP group in this process: stage 0
            self.worker.pp_rank = 0
        self.worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return None if self.worker is None else self.worker.handshake

    def _meta(self) -> KVStoreConnectorMetadata | None:
        meta = self._connector_metadata
        return meta if isinstance(meta, KVStoreConnectorMetadata) else None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._meta()
        if self.worker is not None and meta is not None:
            self.worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        meta = self._meta()
        if self.worker is not None and meta is not None and meta.saves:
            self.worker.save_kv_layer(meta, layer_name)

    def wait_for_save(self, **kwargs: Any) -> None:
        if self.worker is not None:
            self.worker.wait_for_save(self._meta())

    def get_finished(self, finished_req_ids: set[str], **kwargs: Any) -> tuple[set[str] | None, set[str] | None]:
        if self.worker is None:
            return None, None
        return self.worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return set() if self.worker is None else self.worker.take_load_errors()

    def get_kv_connector_kv_cache_events(self) -> KVConnectorKVEvents | None:
        return None if self.worker is None else self.worker.take_events()

    # -- scheduler side ----------------------------------------------------------------

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata],
                                    **kwargs: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.set_handshakes(dict(metadata))

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int,
                                   **kwargs: Any) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int, **kwargs: Any) -> None:
        assert self.scheduler is not None
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput, **kwargs: Any) -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self.scheduler is not None and connector_output.kv_cache_events is not None:
            self.scheduler.add_events(connector_output.kv_cache_events.get_all_events())

    def take_events(self) -> Iterable[KVCacheEvent]:
        """Pool events (medium ``KVSTORE``) for vLLM's KV-event publisher; see connectors.vllm.events."""
        return () if self.scheduler is None else self.scheduler.take_events()

    def request_finished(self, request: Request, block_ids: list[int],
                         **kwargs: Any) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self.scheduler.request_finished(request, block_ids)

    # -- both --------------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """This side's counter increments since the last call (vLLM logs and exports them)."""
        return self._interval.take(self.stats())

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVStoreConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict[type[PromMetric], type[PromMetricT]],
                           labelnames: list[str], per_engine_labelvalues: dict[int, list[object]],
                           ) -> KVConnectorPromMetrics | None:
        return KVStorePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)  # type: ignore[arg-type]

    def stats(self) -> dict[str, Any]:
        """This side's counters (lookups, loads, saves, failures, client hits/misses)."""
        if self.scheduler is not None:
            return dict(self.scheduler.counters)
        assert self.worker is not None
        return self.worker.stats()

    def shutdown(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self.worker is not None:
            self.worker.shutdown()
