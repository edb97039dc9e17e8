"""Tier benchmark: put/get throughput and p50/p99 per tier, against the physical limits.

Measured in one run, side by side:
  * DRAM tier put / get_into / get_view vs single-thread memcpy (NumPy copy of the
    same size over the same working-set size);
  * disk tier put / read vs the disk's sequential direct-I/O bandwidth, measured
    with fio when installed (else a Python O_DIRECT read/write of a large file)
    in the same directory.

    python benchmarks/tiers.py --quick --json bench-results/tiers.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The repo root first: benchmarks/transport.py must not shadow the transport package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import plot_lines, png_for, print_ratios, print_table, summarize, write_json  # noqa: E402

from kvstore import LocalStore  # noqa: E402
from kvstore.memory import aligned_buffer  # noqa: E402
from kvstore.tiers import DiskTier  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
SIZES = {"256KiB": 256 * KiB, "4MiB": 4 * MiB, "32MiB": 32 * MiB}


def bench_dram(size: int, working_set: int, repeat: int) -> dict[str, dict[str, float]]:
    n = max(2, working_set // size)
    rng = np.random.default_rng(0)
    values = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]
    dst = np.empty(size, dtype=np.uint8)
    dst[:] = 1
    out: dict[str, list[float]] = {"memcpy": [], "put": [], "get_into": [], "get_view": [], "get": []}
    with LocalStore(dram=n * size + 64 * MiB, pin_memory="off") as store:
        for i, v in enumerate(values):
            store.put(b"w%d" % i, v)  # warm: every page faulted in
        for r in range(repeat):
            i = r % n
            key = b"k%d" % i
            t0 = time.perf_counter()
            np.copyto(dst, values[i])
            t1 = time.perf_counter()
            store.put(key, values[i])
            t2 = time.perf_counter()
            store.get_into(key, dst)
            t3 = time.perf_counter()
            v = store.get_view(key)
            t4 = time.perf_counter()
            del v
            b = store.get(key)
            t5 = time.perf_counter()
            del b
            store.remove(key)
            out["memcpy"].append(t1 - t0)
            out["put"].append(t2 - t1)
            out["get_into"].append(t3 - t2)
            out["get_view"].append(t4 - t3)
            out["get"].append(t5 - t4)
    return {k: summarize(v, size) for k, v in out.items()}


def fio_bandwidth(directory: Path, size: int, total: int, rw: str) -> float | None:
    """Sequential O_DIRECT bandwidth (GB/s) with fio, or None without fio."""
    if shutil.which("fio") is None:
        return None
    cmd = [
        "fio", "--name=kvbench", f"--directory={directory}", f"--rw={rw}", f"--bs={size}",
        f"--size={total}", "--direct=1", "--ioengine=psync", "--numjobs=1",
        "--output-format=json", "--end_fsync=1" if rw == "write" else "--invalidate=1",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    job = json.loads(r.stdout)["jobs"][0]
    return float(job["read" if rw == "read" else "write"]["bw_bytes"]) / 1e9


def python_direct_bandwidth(directory: Path, size: int, total: int) -> tuple[float, float]:
    """Fallback limit without fio: O_DIRECT write then read of one large file."""
    path = directory / "raw.bin"
    buf = aligned_buffer(size)
    buf[:] = 7
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        t = time.perf_counter()
        for off in range(0, total, size):
            os.pwrite(fd, memoryview(buf), off)
        os.fdatasync(fd)
        w = total / (time.perf_counter() - t) / 1e9
        t = time.perf_counter()
        for off in range(0, total, size):
            os.preadv(fd, [memoryview(buf)], off)
        r = total / (time.perf_counter() - t) / 1e9
    finally:
        os.close(fd)
        path.unlink()
    return r, w


def bench_disk(directory: Path, size: int, total: int, sync: bool) -> dict[str, dict[str, float]]:
    n = max(2, total // size)
    rng = np.random.default_rng(1)
    values = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(min(n, 8))]
    tier_dir = directory / "tier"
    tier = DiskTier(tier_dir, n * size + 16 * MiB, sync=sync)
    aligned = aligned_buffer(size)
    plain = np.empty(size + 1, dtype=np.uint8)[1:]  # deliberately misaligned
    out: dict[str, list[float]] = {"put": [], "read_aligned": [], "read_unaligned": []}
    try:
        for i in range(n):
            t = time.perf_counter()
            tier.put(b"k%d" % i, values[i % len(values)])
            out["put"].append(time.perf_counter() - t)
        for i in range(n):
            t = time.perf_counter()
            tier.read_into(b"k%d" % i, memoryview(aligned))
            out["read_aligned"].append(time.perf_counter() - t)
        for i in range(n):
            t = time.perf_counter()
            tier.read_into(b"k%d" % i, memoryview(plain))
            out["read_unaligned"].append(time.perf_counter() - t)
        direct = tier.direct
    finally:
        tier.close()
        shutil.rmtree(tier_dir)
    res = {k: summarize(v, size) for k, v in out.items()}
    res["meta"] = {"direct_io": float(direct)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
    ap.add_argument("--json", help="write results to this JSON file")
    ap.add_argument("--dir", type=Path, default=Path("."), help="directory for the disk tier (default: .)")
    ap.add_argument("--no-sync", action="store_true", help="measure disk puts without fdatasync")
    args = ap.parse_args()
    repeat = 30 if args.quick else 200
    working = 128 * MiB if args.quick else 512 * MiB
    disk_total = 256 * MiB if args.quick else 1024 * MiB

    results: dict[str, dict] = {"dram": {}, "disk": {}, "limits": {}}  # type: ignore[type-arg]
    rows = []
    for name, size in SIZES.items():
        r = bench_dram(size, working, repeat if size < 32 * MiB else max(10, repeat // 3))
        results["dram"][name] = r
        rows.append({"size": name, **{f"{k}_GBps": v["gbps"] for k, v in r.items()},
                     "get_into_p50_us": r["get_into"]["p50_us"], "get_into_p99_us": r["get_into"]["p99_us"],
                     "put_p99_us": r["put"]["p99_us"]})
    print_table("DRAM tier vs single-thread memcpy (GB/s, p50/p99 in us)", rows,
                ["size", "memcpy_GBps", "put_GBps", "get_into_GBps", "get_view_GBps", "get_GBps",
                 "get_into_p50_us", "get_into_p99_us", "put_p99_us"])

    tmp = Path(tempfile.mkdtemp(prefix="kvbench-", dir=args.dir))
    rows = []
    fio = shutil.which("fio") is not None
    try:
        for name, size in SIZES.items():
            if fio:
                lim_r = fio_bandwidth(tmp, size, disk_total, "read")
                lim_w = fio_bandwidth(tmp, size, disk_total, "write")
                for f in tmp.glob("kvbench*"):
                    f.unlink()
            else:
                lim_r, lim_w = python_direct_bandwidth(tmp, size, disk_total)
            results["limits"][name] = {"disk_read_gbps": lim_r, "disk_write_gbps": lim_w,
                                       "tool": "fio" if fio else "python-odirect"}
            r = bench_disk(tmp, size, disk_total, sync=not args.no_sync)
            results["disk"][name] = r
            rows.append({"size": name, "disk_read_limit": lim_r, "read_aligned": r["read_aligned"]["gbps"],
                         "read_unaligned": r["read_unaligned"]["gbps"], "disk_write_limit": lim_w,
                         "put": r["put"]["gbps"], "read_p50_us": r["read_aligned"]["p50_us"],
                         "read_p99_us": r["read_aligned"]["p99_us"], "put_p99_us": r["put"]["p99_us"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(f"Disk tier vs the disk's direct-I/O bandwidth ({'fio' if fio else 'python O_DIRECT'}; GB/s)",
                rows, ["size", "disk_read_limit", "read_aligned", "read_unaligned", "disk_write_limit",
                       "put", "read_p50_us", "read_p99_us", "put_p99_us"])

    d4, k4, l4 = results["dram"]["4MiB"], results["disk"]["4MiB"], results["limits"]["4MiB"]
    results["ratios"] = {
        "dram_get_vs_memcpy_4MiB": d4["get_into"]["gbps"] / d4["memcpy"]["gbps"],
        "dram_get_view_vs_memcpy_4MiB": d4["get_view"]["gbps"] / d4["memcpy"]["gbps"],
        "dram_put_vs_memcpy_4MiB": d4["put"]["gbps"] / d4["memcpy"]["gbps"],
        "nvme_read_vs_disk_4MiB": k4["read_aligned"]["gbps"] / l4["disk_read_gbps"],
        "nvme_read_unaligned_vs_disk_4MiB": k4["read_unaligned"]["gbps"] / l4["disk_read_gbps"],
        "nvme_put_vs_disk_write_4MiB": k4["put"]["gbps"] / l4["disk_write_gbps"],
    }
    names = list(SIZES)
    plot_lines(png_for(args.json), "Tiers against their limits", "chunk size", "GB/s", names, {
        "memcpy": [results["dram"][n]["memcpy"]["gbps"] for n in names],
        "DRAM get_into": [results["dram"][n]["get_into"]["gbps"] for n in names],
        "DRAM put": [results["dram"][n]["put"]["gbps"] for n in names],
        "disk read limit": [results["limits"][n]["disk_read_gbps"] for n in names],
        "disk read": [results["disk"][n]["read_aligned"]["gbps"] for n in names],
        "disk write limit": [results["limits"][n]["disk_write_gbps"] for n in names],
        "disk put": [results["disk"][n]["put"]["gbps"] for n in names]})
    print_ratios(results["ratios"])
    write_json(args.json, results)


if __name__ == "__main__":
    main()
