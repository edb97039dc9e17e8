"""CUDA backend: csrc/cuda/paged_copy.cu compiled at run time through CuPy (NVRTC).

Imported only when a cache lives on a GPU, so CuPy (``pip install kvstore[gpu]``)
is needed only there and no CUDA toolkit is needed to install. Works on torch
CUDA tensors and CuPy arrays alike (raw device pointers).

Contract: with the chunk in device memory the copy is enqueued on the current
stream of the cache's framework (torch's current stream for torch tensors,
CuPy's otherwise) and the call returns without waiting, like any GPU op. With
the chunk in host memory the bytes pass through a device staging buffer and
the call blocks until they have landed (pin the host buffer for full PCIe
speed). Compiled modules are cached per device; thread-safe.
"""

from __future__ import annotations

import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.kernels.arrays import ArrayInfo
from kvstore.kernels.paged import CopyPlan, PagedCache

SOURCE = "paged_copy.cu"
THREADS = 256
_lock = threading.Lock()
_modules: dict[tuple[int, str], Any] = {}
_sm_counts: dict[int, int] = {}
# Device copy of each cache's per-layer base addresses, uploaded once per cache.
_device_bases: weakref.WeakKeyDictionary[PagedCache, Any] = weakref.WeakKeyDictionary()


def source_path(name: str = SOURCE) -> Path:
    """A .cu file: packaged copy in wheels, csrc/cuda/ in a source checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "cuda_src" / name, here.parents[1] / "csrc" / "cuda" / name):
        if cand.is_file():
            return cand
    raise KVStoreError(f"CUDA kernel source {name} not found next to {here} or in csrc/cuda/")


def cupy() -> Any:
    try:
        import cupy as cp
    except ImportError as e:
        raise KVStoreError(f"the cache is on a GPU but CuPy is missing ({e}); pip install 'kvstore[gpu]'") from e
    return cp


def module(device_id: int, name: str = SOURCE) -> Any:
    """The compiled RawModule of csrc/cuda/``name`` for ``device_id`` (compiled once per device)."""
    with _lock:
        mod = _modules.get((device_id, name))
        if mod is None:
            cp = cupy()
            with cp.cuda.Device(device_id):
                mod = cp.RawModule(code=source_path(name).read_text(), options=("--std=c++17",))
                mod.compile()
            _modules[(device_id, name)] = mod
        return mod


def sm_count(cp: Any, device_id: int) -> int:
    """Streaming multiprocessors of ``device_id`` (queried once)."""
    n = _sm_counts.get(device_id)
    if n is None:  # Device.attributes queries every attribute: far too slow per launch
        n = _sm_counts[device_id] = int(cp.cuda.runtime.deviceGetAttribute(16, device_id))
    return n


def _bases_on_device(cp: Any, cache: PagedCache) -> Any:
    with _lock:
        d = _device_bases.get(cache)
        if d is None:
            d = _device_bases[cache] = cp.asarray(cache.bases_array)
        return d


def _stream(cache: PagedCache, cp: Any) -> Any:
    torch = sys.modules.get("torch")
    if torch is not None and any(isinstance(o, torch.Tensor) for o in cache.owners):
        return cp.cuda.ExternalStream(torch.cuda.current_stream(cache.device_id).cuda_stream)
    return cp.cuda.get_current_stream()


def _vector_bytes(values: list[int]) -> int:
    v = 16
    while v > 1 and any(x % v for x in values):
        v //= 2
    return v


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def run_plan(
    cache: PagedCache, plan: CopyPlan, layer: int | None, ids: np.ndarray, pos: np.ndarray | None,
    info: ArrayInfo, offset: int, is_scatter: bool,
) -> None:
    """Run ``plan`` on layer ``layer`` (None: all); arguments validated by :mod:`kvstore.kernels`."""
    if info.device == "cuda" and info.device_id != cache.device_id:
        raise InvalidArgument(f"chunk on cuda:{info.device_id}, cache on cuda:{cache.device_id}")
    cp = cupy()
    kern_mod = module(cache.device_id)
    bases = cache.bases_array if layer is None else cache.bases_array[layer : layer + 1]
    nbytes = len(bases) * plan.layer_dst
    with cp.cuda.Device(cache.device_id):
        stream = _stream(cache, cp)
        with stream:
            d_bases = _bases_on_device(cp, cache)
            if layer is not None:
                d_bases = d_bases[layer : layer + 1]
            d_ids = cp.asarray(ids)
            d_pos = cp.asarray(pos) if pos is not None else None
            staging = None
            if info.device == "cuda":
                chunk_ptr = info.address + offset
            else:
                staging = cp.empty(nbytes, dtype=cp.uint8)
                chunk_ptr = int(staging.data.ptr)
                if is_scatter:
                    cp.cuda.runtime.memcpyAsync(chunk_ptr, info.address + offset, nbytes, 1, stream.ptr)
            _launch(cp, kern_mod, plan, chunk_ptr, bases, d_bases, d_ids, d_pos, len(ids), is_scatter)
            if staging is not None:
                if not is_scatter:
                    cp.cuda.runtime.memcpyAsync(info.address + offset, chunk_ptr, nbytes, 2, stream.ptr)
                stream.synchronize()


def _launch(
    cp: Any, kern_mod: Any, plan: CopyPlan, chunk_ptr: int, bases: np.ndarray, d_bases: Any,
    d_ids: Any, d_pos: Any, n_ids: int, is_scatter: bool,
) -> None:
    v = _vector_bytes(
        [chunk_ptr, *(int(b) for b in bases), plan.block_stride, plan.kv_src, plan.kv_dst,
         plan.tok_src, plan.tok_dst, plan.head_src, plan.head_dst, plan.run, plan.blk_dst,
         plan.layer_dst]
    )
    kernel = kern_mod.get_function(f"kvs_paged_copy_v{v}")
    items = len(bases) * n_ids
    item_vecs = max(1, plan.layer_dst // plan.chunk_blocks // v)
    sms = sm_count(cp, int(cp.cuda.runtime.getDevice()))
    want = _pow2_ceil(max(1, (8 * sms + items - 1) // items))
    cap = _pow2_ceil(max(1, item_vecs // (THREADS * 8)))  # >= 8 vectors per thread: long-lived CTAs
    gy = max(1, min(want, cap, 32768))
    tpu = min(gy * THREADS, _pow2_ceil(max(1, plan.run * plan.tok_merge // v)))
    i64 = np.int64
    args = (
        np.int32(1 if is_scatter else 0), np.uint64(chunk_ptr), d_bases, d_ids,
        d_pos if d_pos is not None else np.uint64(0), i64(n_ids), i64(plan.num_blocks),
        i64(plan.block_stride), i64(plan.block_tokens), i64(plan.num_tokens), i64(plan.kv_count),
        i64(plan.kv_src), i64(plan.kv_dst), i64(plan.tok_merge), i64(plan.tok_src),
        i64(plan.tok_dst), i64(plan.head_count), i64(plan.head_src), i64(plan.head_dst),
        i64(plan.run), i64(plan.blk_dst), i64(plan.layer_dst), np.int32(tpu),
    )
    kernel((items, gy), (THREADS,), args)


class LayerLauncher:
    """One gather or scatter over fixed block ids, launched layer by layer with no
    per-call set-up: the ids (and, for scatters with repeated ids, their phases) are on
    the device once, so a launch costs one kernel launch of host time. Launches go to
    the current stream of the cache's framework, like :func:`run_plan`; the chunk
    bytes of the layer must be in CUDA memory."""

    def __init__(self, cache: PagedCache, plan: CopyPlan, phases: list[tuple[np.ndarray, np.ndarray | None]],
                 is_scatter: bool) -> None:
        cp = self._cp = cupy()
        self.cache, self.plan, self.is_scatter = cache, plan, is_scatter
        self._mod = module(cache.device_id)
        with cp.cuda.Device(cache.device_id):
            self._d_bases = _bases_on_device(cp, cache)
            self._phases = [(cp.asarray(ids), cp.asarray(pos) if pos is not None else None, len(ids))
                            for ids, pos in phases]

    def launch(self, layer: int, chunk_ptr: int) -> None:
        cp = self._cp
        with cp.cuda.Device(self.cache.device_id), _stream(self.cache, cp):
            bases = self.cache.bases_array[layer : layer + 1]
            for d_ids, d_pos, n in self._phases:
                _launch(cp, self._mod, self.plan, chunk_ptr, bases, self._d_bases[layer : layer + 1], d_ids,
                        d_pos, n, self.is_scatter)
