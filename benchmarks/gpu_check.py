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
  6. runs the tests marked ``gpu`` (``--no-tests`` skips them).

    python benchmarks/gpu_check.py --json bench-results/gpu_check.json
GB/s count chunk bytes once (bytes moved), for kernels and copies alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
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


def pool_dma(cp: Any, repeat: int, size: int = 64 << 20) -> dict[str, Any]:
    """The SDK's CUDA path against a master and a node in this process (same host: the
    client maps the node's arena and page-locks it): raw DMA between the arena and the
    GPU vs cudaMemcpy with a cudaHostAlloc buffer (events), and the client's whole
    verified ``get_into``/``put_from`` of a CUDA buffer (wall clock, verification included)."""
    from kvstore.client import Client
    from kvstore.config import load_config
    from kvstore.master.server import serve_master
    from kvstore.node.daemon import StoreNode

    cfg = load_config(None, {"master.port": 0, "master.metrics_port": -1, "store.dram": "1GiB",
                             "node.node_id": "gpu-check", "node.metrics_port": -1})
    master = serve_master(cfg.master)
    node = None
    try:
        node = StoreNode(load_config(None, {"node.master": master.address, "node.node_id": "gpu-check",
                                            "node.metrics_port": -1, "store.dram": "1GiB"}).node,
                         cfg.store).start()
        value = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
        dev = cp.empty(size, cp.uint8)
        with Client(master.address, timeout=30) as c:
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
    finally:
        if node is not None:
            node.stop()
        master.stop()


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
    res["gpu_tests"] = gpu_tests() if not args.no_tests else None
    write_json(args.json, res)
    passed = res["all_correct"] and res["pool_dma"]["correct"] and (args.no_tests or res["gpu_tests"]["returncode"] == 0)
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
