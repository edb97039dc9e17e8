"""Paged KV gather/scatter: engine blocks <-> layer-major chunk bytes.

One entry point for every backend::

    cache = kernels.paged_cache(vllm_layer_tensors, "vllm_cpu")
    n = kernels.chunk_nbytes(cache, len(block_ids))
    kernels.gather(cache, block_ids, out)          # all layers
    kernels.gather(cache, block_ids, out, layer=3) # layer 3 at its layer_range
    kernels.scatter(cache, block_ids, chunk)

Chunk formats (``fmt``):

* ``"canonical"`` (default): :class:`kvstore.layout.KVLayout` order
  ``[layer][k|v][token][kv_head][head_dim]`` (MLA ``[layer][token][latent]``),
  exchangeable between engines and layouts.
* ``"raw"``: per layer, each block's own bytes in block-list order
  ``[layer][block][block bytes]`` (K then V slab where the engine keeps them
  apart). The fast path for one engine talking to itself; only valid between
  caches with equal :meth:`PagedCache.raw_fingerprint`, which the caller must
  put in the key namespace. Same size and layer ranges as canonical.

Backend choice (``backend="auto"``): CUDA when the cache is on a GPU (torch
CUDA tensors or CuPy arrays; CuPy needed), else the native C++ kernels, else
the NumPy reference, which logs a warning and counts ``stats()["fallback_calls"]``.

Contracts: calls block until the bytes have moved, except device-to-device CUDA
copies, which are ordered on the current stream of the cache's framework.
Every block id and buffer size is checked before memory is touched
(:class:`InvalidArgument`). Scatter with a repeated block id writes the last
occurrence. Thread-safe; concurrent calls must not write the same bytes.
The caller owns every buffer and keeps it alive for the call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.kernels import cpu, reference
from kvstore.kernels.arrays import ArrayInfo, byte_buffer, host_bytes
from kvstore.kernels.paged import (
    PRESETS,
    ChunkFormat,
    CopyPlan,
    PagedCache,
    PagedLayout,
    paged_cache,
)
from kvstore.scatter import Scattered

__all__ = [
    "PRESETS",
    "Backend",
    "ChunkFormat",
    "LayerCopy",
    "PagedCache",
    "PagedLayout",
    "chunk_nbytes",
    "copy",
    "gather",
    "get_num_threads",
    "paged_cache",
    "prepare_layers",
    "raw_pieces",
    "scatter",
    "set_num_threads",
    "stats",
]

Backend = Literal["auto", "native", "numpy", "cuda"]
log = logging.getLogger(__name__)

_lock = threading.Lock()
_counters: dict[str, int] = {}
_config = {"threads": cpu.default_threads(), "warned": 0}


def set_num_threads(n: int) -> None:
    """Default thread count of host copies (per call: ``threads=``)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 64:
        raise InvalidArgument(f"kernel threads must be an int in [1, 64], got {n!r}")
    _config["threads"] = n


def get_num_threads() -> int:
    return _config["threads"]


def stats() -> dict[str, Any]:
    """Counters: ``calls_<backend>``, ``bytes_<backend>``, ``fallback_calls``, native status."""
    with _lock:
        out: dict[str, Any] = {"fallback_calls": 0, **_counters}
    out["native_available"] = cpu.native() is not None
    out["native_error"] = cpu.native_error()
    return out


def _count(backend: str, nbytes: int, fallback: bool = False) -> None:
    with _lock:
        _counters[f"calls_{backend}"] = _counters.get(f"calls_{backend}", 0) + 1
        _counters[f"bytes_{backend}"] = _counters.get(f"bytes_{backend}", 0) + nbytes
        if fallback:
            _counters["fallback_calls"] = _counters.get("fallback_calls", 0) + 1


def chunk_nbytes(
    cache: PagedCache, n_blocks: int, *, fmt: ChunkFormat = "canonical", num_tokens: int | None = None
) -> int:
    """Bytes of a chunk of ``n_blocks`` blocks (all layers) in format ``fmt``."""
    return cache.num_layers * cache.plan(fmt, n_blocks, _tokens(cache, n_blocks, fmt, num_tokens)).layer_dst


def gather(
    cache: PagedCache,
    block_ids: Any,
    out: Any,
    *,
    layer: int | None = None,
    whole_chunk: bool = True,
    fmt: ChunkFormat = "canonical",
    num_tokens: int | None = None,
    threads: int | None = None,
    backend: Backend = "auto",
    positions: Any = None,
) -> int:
    """Copy blocks ``block_ids`` of ``cache`` into chunk buffer ``out``; returns bytes written.

    ``layer=None`` gathers every layer; ``layer=l`` only layer ``l``, written at
    its layer range of ``out`` (or at offset 0 when ``whole_chunk=False``:
    ``out`` then holds that layer alone). ``num_tokens`` (canonical only)
    shortens the last block for a partial chunk. ``positions``: the chunk's block
    slot of each id (default: id ``i`` at slot ``i``); the chunk then has
    ``max(positions) + 1`` slots, and slots no id names are left alone. Ids must
    be distinct with positions, which need the native or CUDA kernels (and, on a
    GPU, the chunk in device memory). See the module docstring.
    """
    return _run(cache, block_ids, out, False, layer, whole_chunk, fmt, num_tokens, threads, backend, positions)


def scatter(
    cache: PagedCache,
    block_ids: Any,
    chunk: Any,
    *,
    layer: int | None = None,
    whole_chunk: bool = True,
    fmt: ChunkFormat = "canonical",
    num_tokens: int | None = None,
    threads: int | None = None,
    backend: Backend = "auto",
    positions: Any = None,
) -> int:
    """Copy chunk bytes ``chunk`` into blocks ``block_ids`` of ``cache``; returns bytes read.

    Arguments as :func:`gather`. A block id listed twice receives its last copy.
    """
    return _run(cache, block_ids, chunk, True, layer, whole_chunk, fmt, num_tokens, threads, backend, positions)


class LayerCopy:
    """A gather or scatter of fixed blocks prepared once and launched per layer
    (:func:`prepare_layers`): the per-call checks and set-up of :func:`gather` and
    :func:`scatter` are paid once, so a launch costs one kernel launch of host time.
    GPU caches only; ``buf`` is one layer's chunk bytes (:attr:`layer_bytes`) in CUDA
    memory, and the launch is ordered on the current stream of the cache's framework."""

    def __init__(self, launcher: Any, layer_bytes: int, num_layers: int) -> None:
        self._launcher, self.layer_bytes, self.num_layers = launcher, layer_bytes, num_layers

    def __call__(self, layer: int, buf: Any) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise InvalidArgument(f"layer {layer!r} outside [0, {self.num_layers})")
        info = byte_buffer(buf, writable=not self._launcher.is_scatter, what="layer chunk")
        if info.device != "cuda" or info.nbytes < self.layer_bytes:
            raise InvalidArgument(f"layer chunk: {self.layer_bytes} bytes of CUDA memory needed, got "
                                  f"{info.nbytes} on {info.device}")
        self._launcher.launch(layer, info.address)


def prepare_layers(cache: PagedCache, block_ids: Any, *, scatter: bool, fmt: ChunkFormat = "canonical",
                   num_tokens: int | None = None) -> LayerCopy:
    """Prepare a per-layer gather (``scatter=False``) or scatter of ``block_ids`` on a
    GPU cache; see :class:`LayerCopy`. Arguments as :func:`gather`."""
    if cache.device != "cuda":
        raise InvalidArgument("prepare_layers is for caches on a GPU; use gather/scatter(layer=...) on the host")
    _, plan, phases, _ = _setup(cache, block_ids, scatter, fmt, num_tokens, None, "cuda")
    from kvstore.kernels import cuda

    return LayerCopy(cuda.LayerLauncher(cache, plan, phases, scatter), plan.layer_dst, cache.num_layers)


def raw_pieces(cache: PagedCache, block_ids: Any, layer: int | Sequence[int]) -> Scattered:
    """Where raw-format bytes of layer ``layer`` of blocks ``block_ids`` live in ``cache``.

    A :class:`~kvstore.scatter.Scattered` over the blocks' dense slabs in raw order
    (per block, K then V where the engine keeps them apart), so a reader can land a
    stored layer range straight in the engine's blocks (``Client.get_into_batch``)
    instead of staging it and scattering. A sequence of layers gives their pieces
    one layer after the other (the destination of one range per layer). Host
    caches only; ids checked as in :func:`scatter`.
    """
    if cache.device != "cpu":
        raise InvalidArgument("raw_pieces: host caches only (a GPU cache takes scatter from staging)")
    lay = cache.layout
    geo = lay.raw_geometry()
    if geo is None:
        raise InvalidArgument("raw_pieces: this layout has no raw-block format (blocks are not dense)")
    layers: list[int] = list(layer) if isinstance(layer, Sequence) else [layer]
    for li in layers:
        if isinstance(li, bool) or not isinstance(li, int) or not 0 <= li < cache.num_layers:
            raise InvalidArgument(f"layer {li!r} outside [0, {cache.num_layers})")
    ids = _block_ids(block_ids, lay.num_blocks)
    kv_count, slab = geo
    starts = ids * lay.block_stride
    if kv_count > 1:
        starts = (starts[:, None] + np.arange(kv_count, dtype=np.int64)[None, :] * lay.kv_stride).reshape(-1)
    bases = cache.bases_array[layers].astype(np.int64)
    addrs = (bases[:, None] + starts[None, :]).reshape(-1)
    return Scattered._of(addrs.astype(np.uint64), np.full(addrs.size, slab, dtype=np.uint64), cache)


def copy(dst: Any, src: Any, *, threads: int | None = None) -> int:
    """Multi-threaded copy of host buffer ``src`` into the start of ``dst``; returns bytes.

    Blocking, GIL released. Falls back to NumPy (counted) without the native build.
    """
    d = byte_buffer(dst, writable=True, what="copy dst")
    s = byte_buffer(src, writable=False, what="copy src")
    if d.device != "cpu" or s.device != "cpu":
        raise InvalidArgument("kernels.copy: host buffers only")
    n = s.nbytes
    if d.nbytes < n:
        raise InvalidArgument(f"kernels.copy: dst holds {d.nbytes} bytes, src has {n}")
    mod = cpu.native()
    if mod is None:
        _warn_fallback()
        _host_bytes(d, n)[:] = _host_bytes(s, n)
        _count("numpy", n, fallback=True)
    else:
        cpu.copy(mod, d.address, s.address, n, _threads(threads))
        _count("native", n)
    return n


def _tokens(cache: PagedCache, n_blocks: int, fmt: ChunkFormat, num_tokens: int | None) -> int:
    bs = cache.layout.block_size
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks <= 0:
        raise InvalidArgument(f"block count must be a positive int, got {n_blocks!r}")
    if num_tokens is None:
        return n_blocks * bs
    if fmt == "raw" and num_tokens != n_blocks * bs:
        raise InvalidArgument("raw chunks hold whole blocks; num_tokens applies to fmt='canonical'")
    if not (n_blocks - 1) * bs < num_tokens <= n_blocks * bs:
        raise InvalidArgument(
            f"num_tokens {num_tokens} does not fit {n_blocks} blocks of {bs} tokens "
            f"(need {(n_blocks - 1) * bs + 1}..{n_blocks * bs})"
        )
    return num_tokens


def _threads(threads: int | None) -> int:
    if threads is None:
        return _config["threads"]
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 64:
        raise InvalidArgument(f"threads must be an int in [1, 64], got {threads!r}")
    return threads


def _block_ids(block_ids: Any, num_blocks: int) -> np.ndarray:
    if not isinstance(block_ids, np.ndarray) and hasattr(block_ids, "tolist"):
        block_ids = block_ids.tolist()  # torch tensors and CuPy arrays, wherever they live
    ids = np.asarray(block_ids)
    if ids.ndim != 1 or ids.size == 0 or not (ids.dtype.kind in "iu" or ids.dtype == object):
        raise InvalidArgument(f"block ids must be a non-empty 1-D integer sequence, got {ids.dtype} {ids.shape}")
    try:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
    except (OverflowError, TypeError) as e:
        raise InvalidArgument(f"block ids are not int64: {e}") from e
    if int(ids.min()) >= 0 and int(ids.max()) < num_blocks:
        return ids
    bad = np.flatnonzero((ids < 0) | (ids >= num_blocks))
    if bad.size:
        i = int(bad[0])
        raise InvalidArgument(
            f"block id {int(ids[i])} at index {i} is outside the cache's [0, {num_blocks}) "
            f"({bad.size} bad id(s))"
        )
    return ids


def _setup(cache: PagedCache, block_ids: Any, is_scatter: bool, fmt: ChunkFormat, num_tokens: int | None,
           positions: Any, backend: Backend) -> tuple[np.ndarray, CopyPlan, list[tuple[np.ndarray, np.ndarray | None]], int]:
    """Checked ids, the copy plan, the kernel passes (ids with their chunk positions, or
    None for "id i at slot i") and the chunk's block slots of one gather or scatter."""
    ids = _block_ids(block_ids, cache.layout.num_blocks)
    pos = None if positions is None else _positions(positions, ids, num_tokens, backend)
    slots = len(ids) if pos is None else int(pos.max()) + 1
    tokens = _tokens(cache, slots, fmt, num_tokens)
    plan = cache.plan(fmt, slots, tokens)
    phases: list[tuple[np.ndarray, np.ndarray | None]]
    if pos is not None:
        phases = [(ids, pos)]
    elif is_scatter:
        phases = _scatter_phases(ids, tokens < len(ids) * cache.layout.block_size)
    else:
        phases = [(ids, None)]
    return ids, plan, phases, slots


def _positions(positions: Any, ids: np.ndarray, num_tokens: int | None, backend: Backend) -> np.ndarray:
    if num_tokens is not None:
        raise InvalidArgument("positions and num_tokens do not combine (every slot is a whole block)")
    if backend == "numpy":
        raise InvalidArgument("positions need the native or CUDA kernels, not backend='numpy'")
    if not isinstance(positions, np.ndarray) and hasattr(positions, "tolist"):
        positions = positions.tolist()
    pos = np.asarray(positions)
    if pos.shape != ids.shape or pos.dtype.kind not in "iu":
        raise InvalidArgument(f"positions must be {len(ids)} integers (one per block id), got {pos.dtype} {pos.shape}")
    pos = np.ascontiguousarray(pos, dtype=np.int64)
    if int(pos.min()) < 0:
        raise InvalidArgument("positions must be >= 0")
    if len(np.unique(ids)) != len(ids) or len(np.unique(pos)) != len(pos):
        raise InvalidArgument("with positions, block ids and positions must each be distinct")
    return pos


def _last_occurrences(ids: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` (at chunk ``positions``) reduced to the last occurrence of each id."""
    _, first_in_reversed = np.unique(ids[::-1], return_index=True)
    keep = np.sort(len(ids) - 1 - first_in_reversed)
    return np.ascontiguousarray(ids[keep]), np.ascontiguousarray(positions[keep], dtype=np.int64)


def _scatter_phases(ids: np.ndarray, partial: bool) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Native scatter passes giving "the last copy wins" without two threads on one block.

    A repeated id keeps its last full copy. A short last block (partial chunk)
    only overwrites its first tokens, so when its id repeats it runs as a
    second pass after the full blocks.
    """
    n = len(ids)
    if len(np.unique(ids)) == n:
        return [(ids, None)]
    every = np.arange(n, dtype=np.int64)
    if partial and ids[-1] in ids[:-1]:
        return [_last_occurrences(ids[:-1], every[:-1]), (ids[-1:], every[-1:])]
    return [_last_occurrences(ids, every)]


def _host_bytes(info: ArrayInfo, n: int, offset: int = 0) -> np.ndarray:
    return host_bytes(info.address + offset, n)


def _warn_fallback() -> None:
    level = logging.WARNING if _config["warned"] == 0 else logging.DEBUG
    _config["warned"] += 1
    log.log(level, "kvstore.kernels: native kernels unavailable (%s); using the slow NumPy "
            "reference (counted in kernels.stats()['fallback_calls'])", cpu.native_error())


def _run(
    cache: PagedCache, block_ids: Any, buf: Any, is_scatter: bool, layer: int | None,
    whole_chunk: bool, fmt: ChunkFormat, num_tokens: int | None, threads: int | None,
    backend: Backend, positions: Any = None,
) -> int:
    what = "scatter chunk" if is_scatter else "gather out"
    nthreads = _threads(threads)
    ids, plan, phases, slots = _setup(cache, block_ids, is_scatter, fmt, num_tokens, positions, backend)
    n = len(ids)
    bases, offset = cache.bases_array, 0
    if layer is not None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < cache.num_layers:
            raise InvalidArgument(f"layer {layer!r} outside [0, {cache.num_layers})")
        bases = bases[layer : layer + 1]
        offset = layer * plan.layer_dst if whole_chunk else 0
    info = byte_buffer(buf, writable=not is_scatter, what=what)
    need = offset + len(bases) * plan.layer_dst
    if info.nbytes < need:
        raise InvalidArgument(
            f"{what}: buffer holds {info.nbytes} bytes; {need} needed "
            f"({len(bases)} layer(s) x {plan.layer_dst} B at offset {offset}, fmt={fmt})"
        )
    nbytes = len(bases) * plan.layer_dst * n // slots
    if cache.device == "cuda" or info.device == "cuda" or backend == "cuda":
        if backend not in ("auto", "cuda"):
            raise InvalidArgument(f"backend {backend!r} cannot reach GPU memory; use 'auto' or 'cuda'")
        if cache.device != "cuda":
            raise InvalidArgument(f"{what}: chunk on GPU but cache on host; move one of them")
        if positions is not None and info.device != "cuda":
            raise InvalidArgument(f"{what}: positions on a GPU cache need the chunk in device memory")
        from kvstore.kernels import cuda  # CuPy is imported only for GPU caches

        for ids_k, pos_k in phases:
            cuda.run_plan(cache, plan, layer, ids_k, pos_k, info, offset, is_scatter)
        _count("cuda", nbytes)
        return nbytes
    mod = None if backend == "numpy" else cpu.native()
    if mod is None and backend == "native":
        raise KVStoreError(f"backend 'native' requested but unavailable: {cpu.native_error()}")
    if mod is not None:
        for ids_k, pos_k in phases:
            cpu.run_plan(
                mod, plan, scatter=is_scatter, chunk_addr=info.address + offset,
                chunk_size=info.nbytes - offset, bases=bases, ids=ids_k, pos=pos_k,
                threads=nthreads,
            )
        _count("native", nbytes)
        return nbytes
    if positions is not None:
        raise KVStoreError(f"positions need the native kernels, unavailable here: {cpu.native_error()}")
    fallback = backend == "auto"
    if fallback:
        _warn_fallback()
    _reference(cache, plan, bases, ids, info, offset, is_scatter, fmt)
    _count("numpy", nbytes, fallback=fallback)
    return nbytes


def _reference(
    cache: PagedCache, plan: CopyPlan, bases: np.ndarray, ids: np.ndarray, info: ArrayInfo,
    offset: int, is_scatter: bool, fmt: ChunkFormat,
) -> None:
    # ids keep their repeats here: the reference scatters in order, so the last copy wins.
    for k, base in enumerate(bases.tolist()):
        chunk = _host_bytes(info, plan.layer_dst, offset + k * plan.layer_dst)
        if is_scatter:
            reference.scatter_layer(base, cache.layout, ids, chunk, fmt, plan.num_tokens)
        else:
            reference.gather_layer(base, cache.layout, ids, chunk, fmt, plan.num_tokens)
