"""GPU check: compile the CUDA kernels, verify them, measure them (a few minutes).

On a machine with an NVIDIA GPU and CuPy:
  1. compiles csrc/cuda/paged_copy.cu through CuPy RawModule (NVRTC);
  2. checks gather and scatter (device and host chunks, both formats, partial
     chunks, repeated ids) against the NumPy reference on several layouts;
  3. measures gather/scatter GB/s of the CUDA kernel (CUDA events around
     back-to-back launches queued behind a spin kernel, so host launch cost is
     excluded) vs a device-to-device copy of the same bytes, plus the wall-clock
     time of a whole kernels.gather()/scatter() call (Python dispatch included);
  4. checks the host arena pinning: Arena(256 MiB, pin="on") H2D/D2H GB/s vs
     a pageable NumPy buffer;
  5. runs a master and a node in this process and measures the SDK's CUDA path on
     the same host: DMA between the node's arena (mapped and page-locked by the
     client) and the GPU vs cudaMemcpy with a cudaHostAlloc buffer
     (``pinned_h2d_vs_cudamemcpy``, ``pinned_d2h_vs_cudamemcpy``), and the client's
     verified ``get_into``/``put_from`` of a CUDA buffer end to end;
  6. batched per-layer launches (every request of a step in one launch, prepared
     once) vs a D2D copy of the same bytes (``gpu_gather_vs_d2d``, ``gpu_scatter_vs_d2d``);
  7. the HBM tier of LocalStore: verified get into a CUDA buffer vs D2D
     (``hbm_tier_get_vs_d2d``, 256 MiB values; 16 and 64 MiB in the table);
  8. a chunk of the HBM tier read by another process through CUDA IPC vs an
     in-process D2D copy (``ipc_d2d_vs_local_d2d``);
  9. a 32-layer LayerLoad under a stand-in forward pass (``pipeline_overlap_fraction``);
 10. transformers on the GPU: the prefill -> decode handoff through a master and a
     node (``hf_gpu_handoff_token_identical``) and a 4096-token prompt of a locally
     built small Llama recomputed vs loaded from the pool
     (``hf_gpu_load_vs_recompute_4096``; ``..._hbm``: from an HBM tier);
 11. runs the tests marked ``gpu`` (``--no-tests`` skips them).

    python benchmarks/gpu_check.py --json bench-results/gpu_check.json
GB/s count chunk bytes once (bytes moved), for kernels and copies alike.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import print_table, write_json  # noqa: E402

from kvstore import kernels  # noqa: E402
from kvstore.kernels import cuda  # noqa: E402

LAYERS, HEADS, DIM, CHUNK_TOKENS = 32, 8, 128, 256
SHAPES = {  # per layer, for the correctness pass
    "vllm_cpu": (9, 4, 16, 128), "flash_nhd": (2, 9, 16, 4, 64), "flash_hnd": (2, 9, 4, 16, 64),
    "flash_nhd_block_first": (9, 2, 16, 4, 64), "mla": (9, 16, 576),
}


def check(cp: Any) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(0)
    for axes, shape in SHAPES.items():
        for dtype, np_t in (("float32", np.float32), ("bfloat16", np.uint16)):
            host = rng.integers(0, 256, size=(3, *shape) + (np.dtype(np_t).itemsize,), dtype=np.uint8)
            host = host.view(np_t).reshape(3, *shape)
            dev = cp.asarray(host)
            spec = "layer " + kernels.PRESETS[axes]
            hc, dc = (kernels.paged_cache(x, spec, dtype=dtype) for x in (host, dev))
            for fmt in ("canonical", "raw"):
                if fmt == "raw" and hc.layout.raw_geometry() is None:
                    continue
                for ids, tokens in (([7, 2, 2, 8, 0], None), ([8, 1, 8], 40 if fmt == "canonical" else None)):
                    n = kernels.chunk_nbytes(hc, len(ids), fmt=fmt, num_tokens=tokens)  # type: ignore[arg-type]
                    want = np.empty(n, np.uint8)
                    kernels.gather(hc, ids, want, fmt=fmt, num_tokens=tokens, backend="numpy")  # type: ignore[arg-type]
                    got = cp.zeros(n, cp.uint8)
                    kernels.gather(dc, ids, got, fmt=fmt, num_tokens=tokens)  # type: ignore[arg-type]
                    ok_dev = bool(np.array_equal(cp.asnumpy(got), want))
                    host_out = np.zeros(n, np.uint8)
                    kernels.gather(dc, ids, host_out, fmt=fmt, num_tokens=tokens)  # type: ignore[arg-type]
                    ok_host = bool(np.array_equal(host_out, want))
                    got[...] = 0
                    for layer in range(3):
                        kernels.gather(dc, ids, got, layer=layer, fmt=fmt, num_tokens=tokens)  # type: ignore[arg-type]
                    ok_layer = bool(np.array_equal(cp.asnumpy(got), want))
                    chunk = rng.integers(0, 256, n, dtype=np.uint8)
                    kernels.scatter(hc, ids, chunk, fmt=fmt, num_tokens=tokens, backend="numpy")  # type: ignore[arg-type]
                    kernels.scatter(dc, ids, cp.asarray(chunk), fmt=fmt, num_tokens=tokens)  # type: ignore[arg-type]
                    cp.cuda.get_current_stream().synchronize()
                    ok_scatter = bool(np.array_equal(cp.asnumpy(dev).view(np.uint8), host.view(np.uint8)))
                    rows.append({"layout": axes, "dtype": dtype, "format": fmt, "ids": str(ids),
                                 "tokens": tokens, "gather": ok_dev, "to_host": ok_host,
                                 "by_layer": ok_layer, "scatter": ok_scatter})
    return rows


SPIN_SRC = r"""
extern "C" __global__ void kvs_spin(long long cycles) {
  long long t0 = clock64();
  while (clock64() - t0 < cycles) {}
}
"""
_spin: list[Any] = []


def events_time(cp: Any, fn: Any, repeat: int) -> float:
    """GPU seconds per call of ``fn`` from CUDA events around ``repeat`` back-to-back calls.

    A ~25 ms spin kernel runs first, so all the calls are queued behind it and
    then run back to back: host-side launch overhead is not counted.
    """
    if not _spin:
        _spin.append(cp.RawKernel(SPIN_SRC, "kvs_spin"))
    fn()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    _spin[0]((1,), (1,), (np.int64(50_000_000),))
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    end.synchronize()
    return float(cp.cuda.get_elapsed_time(start, end)) / 1e3 / repeat


def bench(cp: Any, repeat: int) -> list[dict[str, Any]]:
    rows = []
    rng = np.random.default_rng(1)
    cache_bytes = 4 << 30  # far beyond L2: every copy comes from HBM
    buf = cp.empty(cache_bytes // 2, dtype=cp.uint16)
    chunk = 2 * LAYERS * CHUNK_TOKENS * HEADS * DIM * 2
    outs = [cp.empty(chunk, cp.uint8) for _ in range(4)]
    for bs in (16, 32):
        block_bytes = 2 * bs * HEADS * DIM * 2
        nb = cache_bytes // (LAYERS * block_bytes)
        per = {
            "vllm_cpu": (buf.reshape(LAYERS, nb, HEADS, bs, 2 * DIM), "layer block head token kv*dim"),
            "flash_nhd": (buf.reshape(LAYERS, 2, nb, bs, HEADS, DIM), "layer kv block token head dim"),
            "flash_hnd": (buf.reshape(LAYERS, 2, nb, HEADS, bs, DIM), "layer kv block head token dim"),
        }
        for layout, (arr, spec) in per.items():
            cache = kernels.paged_cache(arr, spec, dtype="float16")
            # 8 random id sets, rotated per call: 8 x 32 MiB of sources outgrow the 50-60 MB L2
            ids = [rng.permutation(nb)[: CHUNK_TOKENS // bs].astype(np.int64) for _ in range(8)]
            for fmt in ("canonical", "raw"):
                if fmt == "raw" and cache.layout.raw_geometry() is None:
                    continue
                plan = cache.plan(fmt, len(ids[0]), CHUNK_TOKENS)  # type: ignore[arg-type]
                for op in ("gather", "scatter"):
                    row = measure(cp, cache, plan, fmt, op, ids, buf, outs, repeat, rng)
                    rows.append({"op": op, "layout": layout, "block": bs, "format": fmt, **row})
    return rows


def measure(cp: Any, cache: kernels.PagedCache, plan: Any, fmt: str, op: str, ids: list[np.ndarray],
            buf: Any, outs: list[Any], repeat: int, rng: np.random.Generator) -> dict[str, float]:
    """Kernel alone vs D2D copy (CUDA events), and the whole kernels API call (wall clock)."""
    chunk = outs[0].nbytes
    mod = cuda.module(cache.device_id)
    d_bases, d_ids = cp.asarray(cache.bases_array), [cp.asarray(x) for x in ids]
    stream = cp.cuda.get_current_stream()
    k = [0]

    def launch() -> None:
        k[0] += 1
        cuda._launch(cp, mod, plan, int(outs[k[0] % 4].data.ptr), cache.bases_array, d_bases,
                     d_ids[k[0] % len(d_ids)], None, len(ids[0]), op == "scatter")

    def d2d() -> None:
        k[0] += 1
        off = int(rng.integers(0, (buf.nbytes - chunk) // 4096)) * 4096
        cp.cuda.runtime.memcpyAsync(int(outs[k[0] % 4].data.ptr), int(buf.data.ptr) + off, chunk, 3, stream.ptr)

    f = kernels.scatter if op == "scatter" else kernels.gather
    t_k = events_time(cp, launch, repeat)
    t_c = events_time(cp, d2d, repeat)
    t0 = time.perf_counter()
    for i in range(repeat):
        f(cache, ids[i % len(ids)], outs[i % 4], fmt=fmt)  # type: ignore[arg-type]
    stream.synchronize()
    t_api = (time.perf_counter() - t0) / repeat
    return {"kernel_GB/s": chunk / t_k / 1e9, "d2d_GB/s": chunk / t_c / 1e9, "vs_d2d": t_c / t_k,
            "api_us": t_api * 1e6, "api_GB/s": chunk / t_api / 1e9}


def pinning(cp: Any, repeat: int) -> list[dict[str, Any]]:
    from kvstore.memory import Arena

    n = 256 << 20
    dev = cp.empty(n, cp.uint8)
    rows = []
    arena = Arena(n, pin="on", name="gpu-check")
    alloc = arena.alloc(n)
    pinned = np.frombuffer(alloc.view(), dtype=np.uint8)
    pageable = np.ones(n, np.uint8)
    stream = cp.cuda.get_current_stream()
    for name, host in (("arena pin=on", pinned), ("pageable numpy", pageable)):
        addr = int(host.ctypes.data)
        h2d = events_time(cp, lambda a=addr: cp.cuda.runtime.memcpyAsync(int(dev.data.ptr), a, n, 1, stream.ptr), repeat)
        d2h = events_time(cp, lambda a=addr: cp.cuda.runtime.memcpyAsync(a, int(dev.data.ptr), n, 2, stream.ptr), repeat)
        rows.append({"host buffer": name, "pinned": arena.pinned if name.startswith("arena") else False,
                     "H2D_GB/s": n / h2d / 1e9, "D2H_GB/s": n / d2h / 1e9})
    del pinned
    alloc.release()
    arena.close()
    return rows


@contextlib.contextmanager
def _pool(node_id: str, dram: str) -> Iterator[str]:
    """A master and one node in this process (the node on this host: same-host clients map
    its arena); yields the master's address."""
    from kvstore.config import load_config
    from kvstore.master.server import serve_master
    from kvstore.node.daemon import StoreNode

    cfg = load_config(None, {"master.port": 0, "master.metrics_port": -1, "store.dram": dram})
    master = serve_master(cfg.master)
    node = None
    try:
        node = StoreNode(load_config(None, {"node.master": master.address, "node.node_id": node_id,
                                            "node.metrics_port": -1}).node, cfg.store).start()
        yield master.address
    finally:
        if node is not None:
            node.stop()
        master.stop()


def pool_dma(cp: Any, repeat: int, size: int = 64 << 20) -> dict[str, Any]:
    """The SDK's CUDA path against a master and a node in this process (same host: the
    client maps the node's arena and page-locks it): raw DMA between the arena and the
    GPU vs cudaMemcpy with a cudaHostAlloc buffer (events), and the client's whole
    verified ``get_into``/``put_from`` of a CUDA buffer (wall clock, verification included)."""
    from kvstore.client import Client

    with _pool("gpu-check", "1GiB") as address:
        value = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
        dev = cp.empty(size, cp.uint8)
        with Client(address, timeout=30) as c:
            assert c.put(b"gpu-check", value)
            assert c.get_into(b"gpu-check", dev) == size  # registers the arena, checks the path
            ok = bool(np.array_equal(cp.asnumpy(dev), value))
            known = c._locations.get(b"gpu-check") if c._locations is not None else None
            (conn,) = c._conns._conns.values()
            assert known is not None and conn.mapped is not None
            extent = conn.mapped.arena[known.offset:known.offset + size]
            src = int(np.frombuffer(extent, dtype=np.uint8).ctypes.data)
            pinned = cp.cuda.alloc_pinned_memory(size)
            stream = cp.cuda.get_current_stream()
            dptr = int(dev.data.ptr)
            rt = cp.cuda.runtime
            t_arena_h2d = events_time(cp, lambda: rt.memcpyAsync(dptr, src, size, 1, stream.ptr), repeat)
            t_pin_h2d = events_time(cp, lambda: rt.memcpyAsync(dptr, pinned.ptr, size, 1, stream.ptr), repeat)
            t_arena_d2h = events_time(cp, lambda: rt.memcpyAsync(src, dptr, size, 2, stream.ptr), repeat)
            t_pin_d2h = events_time(cp, lambda: rt.memcpyAsync(pinned.ptr, dptr, size, 2, stream.ptr), repeat)
            c.remove(b"gpu-check", force=True)  # its extent was overwritten above
            assert c.put_from(b"gpu-check", dev)
            t0 = time.perf_counter()
            for _ in range(repeat):
                assert c.get_into(b"gpu-check", dev) == size
            t_get = (time.perf_counter() - t0) / repeat
            t0 = time.perf_counter()
            for i in range(repeat):
                assert c.put_from(b"gpu-check-%d" % i, dev)
            t_put = (time.perf_counter() - t0) / repeat
            c.remove_batch([b"gpu-check-%d" % i for i in range(repeat)], force=True)
            host = np.empty(size, np.uint8)
            t0 = time.perf_counter()
            for _ in range(repeat):
                assert c.get_into(b"gpu-check", host) == size
            t_host = (time.perf_counter() - t0) / repeat
            return {"correct": ok and bool(np.array_equal(host, value)), "bytes": size,
                    "arena_h2d_GB/s": size / t_arena_h2d / 1e9, "cudaHostAlloc_h2d_GB/s": size / t_pin_h2d / 1e9,
                    "arena_d2h_GB/s": size / t_arena_d2h / 1e9, "cudaHostAlloc_d2h_GB/s": size / t_pin_d2h / 1e9,
                    "client_get_into_cuda_GB/s": size / t_get / 1e9, "client_put_from_cuda_GB/s": size / t_put / 1e9,
                    "client_get_into_host_GB/s": size / t_host / 1e9,
                    "pinned_h2d_vs_cudamemcpy": t_pin_h2d / t_arena_h2d,
                    "pinned_d2h_vs_cudamemcpy": t_pin_d2h / t_arena_d2h}


def _wall(fn: Any, repeat: int) -> float:
    """Wall-clock seconds per call of ``fn`` (each call returns once its work is done)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def step_batched(cp: Any, repeat: int, requests: int = 8, blocks: int = 16) -> list[dict[str, Any]]:
    """One launch per layer for every request of a step (``requests`` x ``blocks`` blocks of
    16 tokens, random, prepared once: kernels.prepare_layers) vs a device-to-device copy of
    one layer's bytes (events), and the host time of one launch (wall clock)."""
    rows = []
    rng = np.random.default_rng(3)
    k = [0]
    cache_bytes = 4 << 30
    buf = cp.empty(cache_bytes // 2, dtype=cp.uint16)
    bs = 16
    nb = cache_bytes // (LAYERS * 2 * bs * HEADS * DIM * 2)
    for layout, (arr, spec) in {
        "flash_nhd": (buf.reshape(LAYERS, 2, nb, bs, HEADS, DIM), "layer kv block token head dim"),
        "flash_hnd": (buf.reshape(LAYERS, 2, nb, HEADS, bs, DIM), "layer kv block head token dim"),
    }.items():
        cache = kernels.paged_cache(arr, spec, dtype="float16")
        ids = rng.permutation(nb)[: requests * blocks].astype(np.int64)
        for op in ("gather", "scatter"):
            copy = kernels.prepare_layers(cache, ids, scatter=op == "scatter")
            n = copy.layer_bytes
            outs = [cp.empty(n, cp.uint8) for _ in range(4)]

            def launch(copy: Any = copy, outs: list[Any] = outs) -> None:
                k[0] += 1
                copy(k[0] % LAYERS, outs[k[0] % 4])

            def d2d(n: int = n, outs: list[Any] = outs) -> None:
                k[0] += 1
                off = int(rng.integers(0, (buf.nbytes - n) // 4096)) * 4096
                cp.cuda.runtime.memcpyAsync(int(outs[k[0] % 4].data.ptr), int(buf.data.ptr) + off, n, 3,
                                            cp.cuda.get_current_stream().ptr)

            t_k = events_time(cp, launch, repeat * 4)
            t_c = events_time(cp, d2d, repeat * 4)
            t0 = time.perf_counter()
            for _ in range(LAYERS):
                launch()
            host = (time.perf_counter() - t0) / LAYERS
            cp.cuda.get_current_stream().synchronize()
            rows.append({"op": op, "layout": layout, "blocks": len(ids), "layer_MiB": n / 2**20,
                         "kernel_GB/s": n / t_k / 1e9, "d2d_GB/s": n / t_c / 1e9, "vs_d2d": t_c / t_k,
                         "host_us_per_launch": host * 1e6})
    return rows


def hbm_tier(cp: Any, repeat: int) -> list[dict[str, Any]]:
    """LocalStore's HBM tier: a verified get_into a CUDA buffer (one kernel copies and sums)
    vs cudaMemcpy device to device of the same bytes; wall clock, each call synchronized."""
    from kvstore import LocalStore

    rows = []
    with LocalStore(dram="1GiB", hbm="2GiB", prefault=False) as s:
        stream = cp.cuda.get_current_stream()
        for size in (16 << 20, 64 << 20, 256 << 20):
            value = cp.random.randint(0, 256, size, dtype=cp.int32).astype(cp.uint8)
            key = b"hbm-%d" % size
            t_put = _wall(lambda v=value, k=key: s.put(k, v), max(3, repeat // 4))
            out = cp.empty(size, cp.uint8)

            def get(o: Any = out, k: bytes = key, n: int = size) -> None:
                if s.get_into(k, o) != n:
                    raise RuntimeError("an HBM tier get missed")

            t_get = _wall(get, repeat)
            ok = bool(cp.array_equal(out, value))
            src, dst = int(value.data.ptr), int(out.data.ptr)

            def d2d(src: int = src, dst: int = dst, n: int = size) -> None:
                cp.cuda.runtime.memcpyAsync(dst, src, n, 3, stream.ptr)
                stream.synchronize()

            t_d2d = _wall(d2d, repeat)
            t_host = _wall(lambda k=key: s.get(k), max(3, repeat // 4))
            t_view = _wall(lambda k=key: s.device_view(k), repeat)
            rows.append({"MiB": size >> 20, "correct": ok, "get_into_cuda_GB/s": size / t_get / 1e9,
                         "d2d_GB/s": size / t_d2d / 1e9, "vs_d2d": t_d2d / t_get, "put_GB/s": size / t_put / 1e9,
                         "get_to_host_GB/s": size / t_host / 1e9, "device_view_us": t_view * 1e6})
            s.remove(key)
    return rows


_IPC_READER = r"""
import json, sys, time
import cupy as cp
from kvstore.devmem import device_buffer
from kvstore.tiers.cuda_device import CudaHbmDevice
from kvstore.tiers.hbm import DeviceChunk, read_exported
d = json.loads(sys.stdin.read())
repeat = d.pop("repeat")
chunk = DeviceChunk.from_dict({**d, "handle": bytes.fromhex(d["handle"]), "key": bytes.fromhex(d["key"])})
dev = CudaHbmDevice(0)
out = cp.empty(chunk.size, cp.uint8)
buf = device_buffer(out)
ok = read_exported(chunk, buf, dev)
t0 = time.perf_counter()
for _ in range(repeat):
    ok = read_exported(chunk, buf, dev) and ok
t_ipc = (time.perf_counter() - t0) / repeat
src = cp.empty(chunk.size, cp.uint8)
stream = cp.cuda.get_current_stream()
t0 = time.perf_counter()
for _ in range(repeat):
    cp.cuda.runtime.memcpyAsync(int(src.data.ptr), int(out.data.ptr), chunk.size, 3, stream.ptr)
    stream.synchronize()
t_local = (time.perf_counter() - t0) / repeat
print(json.dumps({"ok": bool(ok), "sum": int(out.astype(cp.int64).sum()), "t_ipc": t_ipc, "t_local": t_local}))
"""


def ipc(cp: Any, repeat: int, size: int = 256 << 20) -> dict[str, Any]:
    """A chunk of this process's HBM tier read by another process through CUDA IPC (device to
    device, verified as it copies) vs an in-process cudaMemcpy of the same bytes there."""
    import json
    import subprocess

    from kvstore import LocalStore

    with LocalStore(dram="512MiB", hbm="1GiB", prefault=False) as s:
        value = cp.random.randint(0, 256, size, dtype=cp.int32).astype(cp.uint8)
        s.put(b"ipc", value)
        chunk = s.export(b"ipc")
        assert chunk is not None
        d = chunk.to_dict()
        d.update(handle=d["handle"].hex(), key=d["key"].hex(), repeat=repeat)
        proc = subprocess.run([sys.executable, "-c", _IPC_READER], input=json.dumps(d), capture_output=True,
                              text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
        s.release_export(chunk)
        if proc.returncode != 0:
            return {"correct": False, "error": proc.stderr.strip().splitlines()[-3:]}
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        want = int(value.astype(cp.int64).sum())
    return {"MiB": size >> 20, "correct": got["ok"] and got["sum"] == want,
            "ipc_GB/s": size / got["t_ipc"] / 1e9, "local_d2d_GB/s": size / got["t_local"] / 1e9,
            "ipc_d2d_vs_local_d2d": got["t_local"] / got["t_ipc"]}


def pipeline_overlap(repeat: int, tokens: int = 2048, new_tokens: int = 512) -> dict[str, Any]:
    """A layer-wise load of 32 layers (LayerLoad: H2D from page-locked memory and a scatter
    per layer on a side stream) under a stand-in forward pass: per layer, the matmuls of a
    Llama-3-8B layer (hidden 4096, 8 KV heads, MLP 14336, bf16) over ``new_tokens`` new
    tokens, waiting for its layer's event first. Hidden fraction =
    (compute + transfer - together) / transfer, from wall-clock medians."""
    import torch

    from kvstore.kernels.pipeline import LayerLoad

    dev = torch.device("cuda", 0)
    bs, heads, dim = 16, 8, 128
    nb = tokens // bs * 2
    layers = [torch.zeros(2, nb, bs, heads, dim, dtype=torch.bfloat16, device=dev) for _ in range(LAYERS)]
    cache = kernels.paged_cache(layers, "flash_nhd")
    ids = np.random.default_rng(4).permutation(nb)[: tokens // bs].astype(np.int64)
    per = kernels.prepare_layers(cache, ids, scatter=True).layer_bytes
    host = torch.randint(0, 255, (LAYERS * per,), dtype=torch.uint8).pin_memory()
    chunks = [host[i * per : (i + 1) * per] for i in range(LAYERS)]
    staging = torch.empty(LAYERS * per, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream(dev)
    hid, kv, mlp = 4096, 2 * heads * dim, 14336
    x = torch.randn(new_tokens, hid, dtype=torch.bfloat16, device=dev)
    w_qkv = torch.randn(hid, hid + kv, dtype=torch.bfloat16, device=dev) * 0.01
    w_o = torch.randn(hid, hid, dtype=torch.bfloat16, device=dev) * 0.01
    w_up = torch.randn(hid, 2 * mlp, dtype=torch.bfloat16, device=dev) * 0.01
    w_down = torch.randn(mlp, hid, dtype=torch.bfloat16, device=dev) * 0.01

    def layer_compute(h: Any) -> Any:
        q = h @ w_qkv
        a = q[:, :hid] @ w_o
        up = (h + a) @ w_up
        return (up[:, :mlp] * up[:, mlp:]) @ w_down

    def compute_only() -> None:
        h = x
        for _ in range(LAYERS):
            h = layer_compute(h) * 0.01 + x
        torch.cuda.synchronize(dev)

    def transfer_only() -> None:
        LayerLoad(cache, ids, chunks, stream=side, staging=staging).synchronize()

    def together() -> None:
        load = LayerLoad(cache, ids, chunks, stream=side, staging=staging)
        h = x
        for layer in range(LAYERS):
            load.wait(layer)
            h = layer_compute(h) * 0.01 + x
        torch.cuda.synchronize(dev)

    def median(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_c, t_x, t_both = median(compute_only), median(transfer_only), median(together)
    check = [torch.zeros_like(t) for t in layers]
    kernels.scatter(kernels.paged_cache(check, "flash_nhd"), ids, host.to(dev))
    torch.cuda.synchronize(dev)
    ok = all(torch.equal(a, b) for a, b in zip(check, layers, strict=True))
    hidden = max(0.0, min(1.0, (t_c + t_x - t_both) / t_x))
    return {"layers": LAYERS, "load_MiB": LAYERS * per / 2**20, "correct": ok, "compute_ms": t_c * 1e3,
            "transfer_ms": t_x * 1e3, "together_ms": t_both * 1e3, "pipeline_overlap_fraction": hidden}


def hf_gpu(cp: Any, repeat: int, tokens: int = 4096) -> dict[str, Any]:
    """transformers on the GPU: (1) prefill in one process and decode in another through a
    master and a node (handoff token-identical?); (2) a small Llama built locally (16 layers,
    hidden 2048, 4 KV heads, fp32): recomputing a 4096-token prompt vs loading its KV from
    the pool into CUDA memory (import_cache through the client), and from an HBM tier."""
    import json
    import os
    import subprocess
    import tempfile

    import torch
    from transformers import DynamicCache

    from connectors.hf.cache import export_cache, import_cache, model_namespace
    from connectors.hf.handoff import _model
    from connectors.testing.tiny_model import TinyModelSpec, build_tiny_llama
    from kvstore import LocalStore
    from kvstore.client import Client

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(root)}
    out: dict[str, Any] = {}
    with _pool("gpu-check-hf", "2GiB") as address:
        with tempfile.TemporaryDirectory(prefix="gpu-check-hf-") as d:
            tiny = build_tiny_llama(Path(d) / "tiny", TinyModelSpec(layers=4, hidden=256, heads=4, kv_heads=2))
            prompt = json.dumps(list(range(2, 302)))

            def run(op: str) -> dict[str, Any]:
                r = subprocess.run([sys.executable, "-m", "connectors.hf.handoff", op, str(tiny), address,
                                    prompt, "16", "64", "cuda"], capture_output=True, text=True, env=env,
                                   cwd=root, timeout=180)
                if r.returncode != 0:
                    raise RuntimeError(f"{op}: {r.stderr.strip().splitlines()[-3:]}")
                return dict(json.loads(r.stdout.strip().splitlines()[-1]))

            want, _, got = run("local"), run("prefill"), run("decode")
            out["hf_gpu_handoff_token_identical"] = got["tokens"] == want["tokens"] and got["cached"] == 256
            small = build_tiny_llama(Path(d) / "small", TinyModelSpec(
                layers=16, hidden=2048, heads=32, kv_heads=4, intermediate=5632, vocab=512,
                max_positions=tokens + 64))
            model = _model(str(small), "cuda")
            ids = [int(t) for t in np.random.default_rng(5).integers(2, 500, tokens)]
            ns = model_namespace(model, "gpu-check-small", 256)
            inp = torch.tensor([ids], device="cuda")

            def recompute() -> Any:
                cache = DynamicCache()
                with torch.no_grad():
                    model(input_ids=inp, past_key_values=cache, use_cache=True)
                torch.cuda.synchronize()
                return cache

            cache = recompute()
            t_re = _wall(recompute, max(3, repeat // 4))

            def timed_load(store: Any) -> tuple[Any, float]:
                def load() -> Any:
                    got, n = import_cache(store, ns, ids, device="cuda")
                    torch.cuda.synchronize()
                    assert n == tokens, n
                    return got

                return load(), _wall(load, max(3, repeat // 4))

            with Client(address, timeout=60) as c:
                export_cache(c, ns, ids, cache)
                loaded, t_pool = timed_load(c)
            with LocalStore(dram="1GiB", hbm="4GiB", prefault=False) as s:
                export_cache(s, ns, ids, cache)
                _, t_hbm = timed_load(s)
            same = all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                       for a, b in zip(loaded.layers, cache.layers, strict=True)) if hasattr(cache, "layers") else None
            kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)) \
                if hasattr(cache, "layers") else 0
            out.update({"tokens": tokens, "kv_MiB": kv / 2**20, "loaded_equals_computed": same,
                        "recompute_ms": t_re * 1e3, "load_pool_ms": t_pool * 1e3, "load_hbm_ms": t_hbm * 1e3,
                        "hf_gpu_load_vs_recompute_4096": t_re / t_pool,
                        "hf_gpu_load_vs_recompute_4096_hbm": t_re / t_hbm})
    return out


def gpu_tests() -> dict[str, Any]:
    """Run the tests marked ``gpu`` (they need pytest and what the suite needs: carry
    wheels such as rocksdict where the machine has none)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           str(root / "tests")], capture_output=True, text=True, cwd=root, timeout=300)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    print("gpu tests:", *tail, sep="\n  ")
    return {"returncode": proc.returncode, "tail": tail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write results to this file")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--no-tests", action="store_true", help="skip running the tests marked gpu")
    args = ap.parse_args()
    cp = cuda.cupy()
    props = cp.cuda.runtime.getDeviceProperties(0)
    t0 = time.perf_counter()
    cuda.module(0)
    compile_s = time.perf_counter() - t0
    print(f"device: {props['name'].decode()}, NVRTC compile {compile_s:.2f} s")
    res: dict[str, Any] = {"device": props["name"].decode(), "compile_s": compile_s}
    res["correctness"] = check(cp)
    flags = ("gather", "to_host", "by_layer", "scatter")
    res["all_correct"] = all(r[f] for r in res["correctness"] for f in flags)
    bad = [r for r in res["correctness"] if not all(r[f] for f in flags)]
    print(f"correctness: {len(res['correctness'])} cases, all correct: {res['all_correct']}")
    if bad:
        print_table("FAILED cases", bad, ["layout", "dtype", "format", "ids", "tokens", *flags])
    res["bandwidth"] = bench(cp, args.repeat)
    print_table("CUDA gather/scatter, 32 MiB chunks (32 layers, 8 heads, dim 128, fp16)", res["bandwidth"],
                ["op", "layout", "block", "format", "kernel_GB/s", "d2d_GB/s", "vs_d2d", "api_us", "api_GB/s"])
    ratios = [r["vs_d2d"] for r in res["bandwidth"]]
    res["ratios"] = {
        f"{op}_vs_d2d_min": min(r["vs_d2d"] for r in res["bandwidth"] if r["op"] == op)
        for op in ("gather", "scatter")
    } | {"vs_d2d_median": statistics.median(ratios)}
    print("ratios:", {k: round(v, 3) for k, v in res["ratios"].items()})
    res["pinning"] = pinning(cp, max(3, args.repeat // 4))
    print_table("host arena pinning (256 MiB copies)", res["pinning"], ["host buffer", "pinned", "H2D_GB/s", "D2H_GB/s"])
    res["pool_dma"] = pool_dma(cp, max(3, args.repeat // 2))
    print_table("SDK CUDA buffers, same host (64 MiB; the pool's arena page-locked by the client)", [res["pool_dma"]],
                [k for k in res["pool_dma"] if k not in ("pinned_h2d_vs_cudamemcpy", "pinned_d2h_vs_cudamemcpy")])
    for k in ("pinned_h2d_vs_cudamemcpy", "pinned_d2h_vs_cudamemcpy"):
        res["ratios"][k] = res["pool_dma"][k]
    print("ratios:", {k: round(v, 3) for k, v in res["ratios"].items()})
    res["step_batched"] = step_batched(cp, args.repeat)
    print_table("batched per-layer launches: every request of a step (8 x 16 blocks) in one launch",
                res["step_batched"], ["op", "layout", "blocks", "layer_MiB", "kernel_GB/s", "d2d_GB/s", "vs_d2d",
                                      "host_us_per_launch"])
    for op in ("gather", "scatter"):
        res["ratios"][f"gpu_{op}_vs_d2d"] = min(r["vs_d2d"] for r in res["step_batched"] if r["op"] == op)
    sections: list[tuple[str, Any]] = [
        ("hbm_tier", lambda: hbm_tier(cp, args.repeat)),
        ("ipc", lambda: ipc(cp, max(5, args.repeat // 2))),
        ("pipeline", lambda: pipeline_overlap(max(5, args.repeat // 2))),
        ("hf_gpu", lambda: hf_gpu(cp, args.repeat)),
    ]
    for name, fn in sections:  # one failing section does not hide the others' figures
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - reported in the JSON and the exit code
            res[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name} FAILED: {res[name]['error']}")
    if isinstance(res["hbm_tier"], list):
        print_table("HBM tier: verified get_into a CUDA buffer vs cudaMemcpy D2D", res["hbm_tier"],
                    list(res["hbm_tier"][0]))
        res["ratios"]["hbm_tier_get_vs_d2d"] = next(r["vs_d2d"] for r in res["hbm_tier"] if r["MiB"] == 256)
    for name, keys in (("ipc", ["ipc_d2d_vs_local_d2d"]), ("pipeline", ["pipeline_overlap_fraction"]),
                       ("hf_gpu", ["hf_gpu_handoff_token_identical", "hf_gpu_load_vs_recompute_4096",
                                   "hf_gpu_load_vs_recompute_4096_hbm"])):
        if "error" not in res[name]:
            print_table(name, [res[name]], list(res[name]))
            for k in keys:
                res["ratios"][k] = res[name][k]
    print("ratios:", {k: round(v, 3) if isinstance(v, float) else v for k, v in res["ratios"].items()})
    res["gpu_tests"] = gpu_tests() if not args.no_tests else None
    write_json(args.json, res)
    sections_ok = all(
        "error" not in res[n] and (all(r["correct"] for r in res[n]) if isinstance(res[n], list)
                                   else res[n].get("correct", True) is not False)
        for n in ("hbm_tier", "ipc", "pipeline", "hf_gpu"))
    passed = res["all_correct"] and res["pool_dma"]["correct"] and sections_ok and \
        res["ratios"].get("hf_gpu_handoff_token_identical") is True and \
        (args.no_tests or res["gpu_tests"]["returncode"] == 0)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
