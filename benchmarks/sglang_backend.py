"""SGLang HiCache L3: kvstore's backend vs SGLang's built-in ``file`` backend, and memcpy.

64-page batches of a Llama-8B-shaped host pool (32 layers, 8 KV heads, head_dim
128, bf16, 64-token pages: 8 MiB a page, 512 MiB a batch) through SGLang's real
``MHATokenToKVPoolHost`` (CPU, unpinned). kvstore: ``batch_set_v1`` /
``batch_get_v1`` (zero-copy into the pool's page slabs) against a real master +
node on loopback. ``file``: ``HiCacheFile`` on local disk, driven the way SGLang's
controller drives a non-v1 backend (``get_data_page`` -> ``batch_set``;
``batch_get`` into dummy pages -> ``set_from_flat_data_page``). memcpy: one copy
of the same bytes between two buffers. ``kvstore_set`` writes into arena memory
the benchmark process has not touched before (its page tables are populated on
the way: the first fill of a pool); ``kvstore_set_reused`` writes after the
previous batch was removed, into extents whose pages are mapped already (a full
cache recycling its memory). Runs in ``.venv-sglang`` (``make bench``)::

    .venv-sglang/bin/python benchmarks/sglang_backend.py --quick --json bench-results/sglang_backend.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "sglang")]
try:
    import torchvision  # noqa: F401
except ImportError:  # PyPI's torchvision cannot load beside CPU torch (tests/sglang/README.md)
    sys.path.insert(0, str(ROOT / "tests" / "sglang" / "shims"))

import numpy as np  # noqa: E402
import pools  # noqa: E402
import torch  # noqa: E402

from kvstore.testing.cluster import Cluster  # noqa: E402

GB = 1e9


def run(pages: int, batches: int, layers: int) -> dict[str, Any]:
    host = pools.mha_host("page_first", torch.bfloat16, layers=layers, heads=8, dim=128, page=64,
                          tokens=pages * 64)
    pools.fill(host, 0)
    page_bytes = host.get_size_per_token() * 64
    batch_bytes = pages * page_bytes
    res: dict[str, Any] = {"page_bytes": page_bytes, "pages_per_batch": pages, "batches": batches,
                           "layers": layers, "rows": {}}
    src = pools.pages(host, pages)
    # the host pool holds `2 * pages` pages: the source batch and a destination batch
    dst = pools.pages(host, pages)

    def timed(fn: Any) -> list[float]:
        out = []
        for b in range(batches):
            t0 = time.perf_counter()
            fn(b)
            out.append(time.perf_counter() - t0)
        return out

    with tempfile.TemporaryDirectory(prefix="sgl-bench-") as d:
        with Cluster(Path(d) / "pool", dram=f"{(batches + 1) * batch_bytes // (1 << 20) + 64}MiB").start(1) as cl:
            be = pools.backend(cl.master_address, host)
            keys = [pools.keys(pages, f"bench-{b}") for b in range(batches)]
            set_t = timed(lambda b: _check(be.batch_set_v1(keys[b], src), "kvstore set"))
            get_t = timed(lambda b: _check(be.batch_get_v1(keys[b], dst), "kvstore get"))
            assert pools.page_bytes(host, dst, pages - 1) == pools.page_bytes(host, src, pages - 1)
            # steady state: the pages go into arena memory this process has written before
            # (a full cache recycles its extents), so its page tables are already populated
            again = [pools.keys(pages, f"again-{b}") for b in range(batches)]

            def set_again(b: int) -> None:
                be.client.remove_batch(be._keys(keys[b], "v1"), force=True)
                t0 = time.perf_counter()
                _check(be.batch_set_v1(again[b], src), "kvstore set (reused arena)")
                reused_t.append(time.perf_counter() - t0)

            reused_t: list[float] = []
            for b in range(batches):
                set_again(b)
            be.close()
        from sglang.srt.mem_cache.hicache_storage import HiCacheFile

        fb = HiCacheFile(pools.storage_config({}), file_path=str(Path(d) / "file"))
        fb.register_mem_pool_host(host)
        ps = host.page_size
        fkeys = [pools.keys(pages, f"file-{b}") for b in range(batches)]

        def file_set(b: int) -> None:
            data = [host.get_data_page(int(src[i * ps]), flat=True) for i in range(pages)]
            _check([fb.batch_set(fkeys[b], data)], "file set")

        def file_get(b: int) -> None:
            got = fb.batch_get(fkeys[b], [host.get_dummy_flat_data_page() for _ in range(pages)])
            for i, page in enumerate(got):
                _check([page is not None], "file get")
                host.set_from_flat_data_page(int(dst[i * ps]), page)

        fset_t = timed(file_set)
        fget_t = timed(file_get)
    a = np.random.default_rng(0).integers(0, 256, batch_bytes, dtype=np.uint8)
    bufs = [np.empty_like(a) for _ in range(2)]
    for b in bufs:
        b.fill(1)
    mem_t = timed(lambda b: np.copyto(bufs[b % 2], a))
    for name, ts in (("kvstore_set", set_t), ("kvstore_set_reused", reused_t), ("kvstore_get", get_t),
                     ("file_set", fset_t), ("file_get", fget_t), ("memcpy", mem_t)):
        med = statistics.median(ts)
        res["rows"][name] = {"median_s": round(med, 4), "GBps": round(batch_bytes / med / GB, 2)}
    r = res["rows"]
    res["ratios"] = {
        "get_vs_file_backend": round(r["kvstore_get"]["GBps"] / r["file_get"]["GBps"], 2),
        "set_vs_file_backend": round(r["kvstore_set"]["GBps"] / r["file_set"]["GBps"], 2),
        "set_reused_vs_file_backend": round(r["kvstore_set_reused"]["GBps"] / r["file_set"]["GBps"], 2),
        "get_vs_memcpy": round(r["kvstore_get"]["GBps"] / r["memcpy"]["GBps"], 2),
    }
    return res


def _check(ok: list[bool], what: str) -> None:
    if not all(ok):
        raise RuntimeError(f"{what}: {ok.count(False)} page(s) failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 batches (default 5)")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument("--pages", type=int, default=64, help="pages per batch")
    ap.add_argument("--layers", type=int, default=32, help="layers of the Llama-shaped pool")
    a = ap.parse_args()
    res = run(a.pages, 3 if a.quick else 5, a.layers)
    print(f"{res['pages_per_batch']} pages x {res['page_bytes'] >> 20} MiB per batch, median of {res['batches']}")
    print(f"{'path':>18} {'ms':>9} {'GB/s':>7}")
    for name, row in res["rows"].items():
        print(f"{name:>18} {row['median_s'] * 1e3:>9.1f} {row['GBps']:>7.2f}")
    print("ratios:", json.dumps(res["ratios"]))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
