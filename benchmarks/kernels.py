"""Paged KV gather/scatter benchmark: native C++ and NumPy reference vs memcpy.

A realistic cache (32 layers, 8 KV heads, head_dim 128, fp16/bf16, blocks of
16 and 32 tokens, 256-token chunks) in engine layouts (vLLM CPU and
FlashAttention NHD), both chunk formats. Every row is compared with a memcpy of
the same byte count measured in the same run, right before it (single-thread and
two-thread, through the same native pool), so machine noise hits both sides.
Block ids are a fresh random draw per call and sources/destinations rotate over
a 1 GiB cache and four chunk buffers, so copies come from DRAM, not cache.

    python benchmarks/kernels.py --quick --json bench-results/kernels.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import plot_lines, png_for, print_table, write_json  # noqa: E402

from kvstore import kernels  # noqa: E402
from kvstore.kernels import cpu  # noqa: E402

LAYERS, HEADS, DIM, CHUNK_TOKENS = 32, 8, 128, 256
CACHE_BYTES = 1 << 30
N_OUT = 4


def interleaved(series: dict[str, Callable[[int], object]], nbytes: int, repeat: int) -> dict[str, float]:
    """GB/s (median) of each series, measured round-robin so load drift hits all alike."""
    for fn in series.values():
        fn(0)  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in series}
    for i in range(1, repeat + 1):
        for name, fn in series.items():
            t = time.perf_counter()
            fn(i)
            samples[name].append(time.perf_counter() - t)
    return {k: nbytes / statistics.median(v) / 1e9 for k, v in samples.items()}


def build_cache(buf: np.ndarray, layout: str, bs: int, dtype: str) -> kernels.PagedCache:
    """Views of the one big buffer, shaped like the engine's cache."""
    block_bytes = 2 * bs * HEADS * DIM * 2
    nb = buf.nbytes // (LAYERS * block_bytes)
    u16 = buf.view(np.uint16)[: LAYERS * nb * block_bytes // 2]
    if layout == "vllm_cpu":  # one [num_blocks, heads, block, 2*dim] view per layer
        per = u16.reshape(LAYERS, nb, HEADS, bs, 2 * DIM)
        return kernels.paged_cache([per[layer] for layer in range(LAYERS)], "vllm_cpu", dtype=dtype)
    if layout == "flash_nhd":  # (layers, 2, num_blocks, block, heads, dim)
        return kernels.paged_cache(
            u16.reshape(LAYERS, 2, nb, bs, HEADS, DIM), "layer kv block token head dim", dtype=dtype
        )
    if layout == "flash_hnd":
        return kernels.paged_cache(
            u16.reshape(LAYERS, 2, nb, HEADS, bs, DIM), "layer kv block head token dim", dtype=dtype
        )
    raise SystemExit(f"unknown layout {layout}")


def run(quick: bool) -> dict[str, Any]:
    mod = cpu.native()
    if mod is None:
        raise SystemExit(f"native kernels missing: {cpu.native_error()}")
    repeat = 9 if quick else 31
    rng = np.random.default_rng(0)
    cache_buf = np.empty(CACHE_BYTES, np.uint8)
    cache_buf[:] = 1  # fault every page in before timing
    chunk = 2 * LAYERS * CHUNK_TOKENS * HEADS * DIM * 2
    outs = [np.ones(chunk, np.uint8) for _ in range(N_OUT)]
    layouts = ["vllm_cpu", "flash_nhd"] + ([] if quick else ["flash_hnd"])
    rows: list[dict[str, Any]] = []

    def memcpy(threads: int) -> Callable[[int], object]:
        def one(i: int) -> None:
            off = int(rng.integers(0, (CACHE_BYTES - chunk) // 4096)) * 4096
            kernels.copy(outs[i % N_OUT], cache_buf[off : off + chunk], threads=threads)

        return one

    for bs in (16, 32):
        for dtype in ("float16", "bfloat16"):
            for layout in layouts:
                cache = build_cache(cache_buf, layout, bs, dtype)
                n_ids = CHUNK_TOKENS // bs
                nb = cache.layout.num_blocks

                def ids(nb: int = nb, n_ids: int = n_ids) -> np.ndarray:
                    return rng.permutation(nb)[:n_ids]

                for fmt in ("canonical", "raw"):
                    if fmt == "raw" and cache.layout.raw_geometry() is None:
                        continue
                    for op in ("gather", "scatter", "gather_layer"):
                        base = {"block": bs, "dtype": dtype, "layout": layout, "format": fmt, "op": op}
                        series: dict[str, Callable[[int], object]] = {
                            "memcpy_1t": memcpy(1), "memcpy_2t": memcpy(2),
                            "native-2t": _op(cache, op, ids, outs, fmt, "native", 2),
                            "native-1t": _op(cache, op, ids, outs, fmt, "native", 1),
                        }
                        gbps = interleaved(series, chunk, repeat)
                        if op != "gather_layer" and dtype == "float16":  # slow: two calls
                            gbps["numpy-1t"] = interleaved(
                                {"numpy-1t": _op(cache, op, ids, outs, fmt, "numpy", 1)}, chunk, 2
                            )["numpy-1t"]
                        m1, m2 = gbps["memcpy_1t"], gbps["memcpy_2t"]
                        for name in ("native-2t", "native-1t", "numpy-1t"):
                            if name in gbps:
                                ref = m2 if name.endswith("2t") else m1
                                rows.append({**base, "backend": name, "GB/s": gbps[name],
                                             "memcpy_1t": m1, "memcpy_2t": m2,
                                             "vs_memcpy": gbps[name] / ref})
    batched = step_batched(cache_buf, repeat)
    return {"rows": rows, "ratios": {**_ratios(rows), "batched_positions_vs_per_request": batched["ratio"]},
            "batched": batched, "chunk_bytes": chunk, "threads_default": kernels.get_num_threads(),
            "quick": quick}


def step_batched(cache_buf: np.ndarray, repeat: int, requests: int = 8, blocks: int = 2) -> dict[str, Any]:
    """A step loading ``requests`` requests of ``blocks`` blocks each, layer by layer (raw,
    flash_nhd, block 16): one scatter per request and layer vs one per layer for all of
    them, each block from its slot of one staging buffer (``positions``). Wall clock of
    the whole 32-layer load, median; the difference is per-call cost."""
    cache = build_cache(cache_buf, "flash_nhd", 16, "float16")
    rng = np.random.default_rng(9)
    ids = rng.permutation(cache.layout.num_blocks)[: requests * blocks].astype(np.int64)
    per_req = kernels.chunk_nbytes(cache, blocks, fmt="raw") // LAYERS
    staging = np.ones(requests * per_req, np.uint8)
    pos = np.arange(requests * blocks, dtype=np.int64)

    def per_request(_: int) -> None:
        for layer in range(LAYERS):
            for r in range(requests):
                kernels.scatter(cache, ids[r * blocks:(r + 1) * blocks], staging[r * per_req:(r + 1) * per_req],
                                layer=layer, whole_chunk=False, fmt="raw")

    def one_call(_: int) -> None:
        for layer in range(LAYERS):
            kernels.scatter(cache, ids, staging, layer=layer, whole_chunk=False, fmt="raw", positions=pos)

    nbytes = LAYERS * len(staging)
    gbps = interleaved({"per_request": per_request, "batched": one_call}, nbytes, repeat)
    return {"requests": requests, "blocks_each": blocks, "layers": LAYERS, "bytes": nbytes,
            "per_request_ms": nbytes / gbps["per_request"] / 1e9 * 1e3, "batched_ms": nbytes / gbps["batched"] / 1e9 * 1e3,
            "ratio": gbps["batched"] / gbps["per_request"]}


def _op(cache: kernels.PagedCache, op: str, ids: Callable[[], np.ndarray], outs: list[np.ndarray],
        fmt: Any, backend: Any, threads: int) -> Callable[[int], object]:
    def gather(i: int) -> None:
        kernels.gather(cache, ids(), outs[i % N_OUT], fmt=fmt, backend=backend, threads=threads)

    def scatter(i: int) -> None:
        kernels.scatter(cache, ids(), outs[i % N_OUT], fmt=fmt, backend=backend, threads=threads)

    def by_layer(i: int) -> None:  # the layer-wise pipeline: one call per layer
        b, out = ids(), outs[i % N_OUT]
        for layer in range(cache.num_layers):
            kernels.gather(cache, b, out, layer=layer, fmt=fmt, backend=backend, threads=threads)

    return {"gather": gather, "scatter": scatter, "gather_layer": by_layer}[op]


def _ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Headline: the worst native-2t row per op (canonical and raw), vs 2-thread memcpy."""
    out: dict[str, float] = {}
    for op in ("gather", "scatter", "gather_layer"):
        for fmt in ("canonical", "raw"):
            sel = [r["vs_memcpy"] for r in rows
                   if r["op"] == op and r["format"] == fmt and r["backend"] == "native-2t"]
            if sel:
                out[f"{op}_{fmt}_vs_memcpy_min"] = min(sel)
                out[f"{op}_{fmt}_vs_memcpy_median"] = statistics.median(sel)
        sel1 = [r["vs_memcpy"] for r in rows if r["op"] == op and r["backend"] == "native-1t"]
        if sel1:
            out[f"{op}_1t_vs_memcpy_1t_min"] = min(sel1)
    out["gather_vs_memcpy"] = min(out["gather_canonical_vs_memcpy_min"], out["gather_raw_vs_memcpy_min"])
    out["scatter_vs_memcpy"] = min(out["scatter_canonical_vs_memcpy_min"], out["scatter_raw_vs_memcpy_min"])
    numpy_rows = [r["vs_memcpy"] for r in rows if r["backend"] == "numpy-1t"]
    if numpy_rows:
        out["numpy_vs_memcpy_median"] = statistics.median(numpy_rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and layouts (< 1 minute)")
    ap.add_argument("--json", help="write results to this file")
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = run(args.quick)
    cols = ["op", "layout", "block", "dtype", "format", "backend", "GB/s", "memcpy_1t", "memcpy_2t", "vs_memcpy"]
    print_table(f"paged gather/scatter, {res['chunk_bytes'] >> 20} MiB chunks (GB/s of chunk bytes)",
                res["rows"], cols)
    b = res["batched"]
    print(f"\na step of {b['requests']} requests x {b['blocks_each']} blocks, {b['layers']} layers: per-request "
          f"scatters {b['per_request_ms']:.2f} ms, one call per layer (positions) {b['batched_ms']:.2f} ms")
    print("\nratios (native 2 threads vs 2-thread memcpy; min = worst layout):")
    for k, v in res["ratios"].items():
        print(f"  {k:36s} {v:.2f}")
    gathers = [r for r in res["rows"] if r["op"] == "gather" and r["format"] == "canonical"]
    labels = list(dict.fromkeys(f"{r['layout']}/{r['block']}/{r['dtype']}" for r in gathers))

    def line(backend: str, col: str = "GB/s") -> list[float | None]:
        by = {f"{r['layout']}/{r['block']}/{r['dtype']}": r[col] for r in gathers if r["backend"] == backend}
        return [by.get(x) for x in labels]

    series = {b: line(b) for b in dict.fromkeys(r["backend"] for r in gathers)}
    series["memcpy (2 threads)"] = [next((r["memcpy_2t"] for r in gathers
                                          if f"{r['layout']}/{r['block']}/{r['dtype']}" == x), None) for x in labels]
    plot_lines(png_for(args.json), "Paged gather (canonical) vs memcpy", "layout / block / dtype", "GB/s",
               labels, series)
    res["seconds"] = time.perf_counter() - t0
    print(f"\n{res['seconds']:.1f} s")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
