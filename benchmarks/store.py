"""Pooled-store benchmark: kvstore (``kvstore up`` on loopback) vs Redis, vs memcpy.

Measured in one run, side by side, for 1, 4 and 32 MiB values with 1 and 4
client processes: put/get throughput and p50/p99 latency through

* kvstore, default client path (same host: shared memory),
* kvstore with the client's location cache (content-addressed keys: no Lookup per get),
* kvstore with the same-host path disabled (TCP),
* Redis (Debian ``redis-server`` on loopback, no persistence; redis-py + hiredis),

plus single-thread memcpy of the same sizes and batched ``LongestPrefix`` keys/s.
``get`` returns a new buffer (like Redis's ``GET``), so it pays for faulting in
fresh pages; ``get_into`` reads into a buffer the caller reuses (what an engine
does) and is the one compared with memcpy into an existing buffer.

    python benchmarks/store.py --quick --json bench-results/store.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The repo root first: benchmarks/transport.py must not shadow the transport package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import print_table, summarize, write_json  # noqa: E402

from kvstore.testing.cluster import CLI, free_port  # noqa: E402

MiB = 1 << 20
SIZES = {"1MiB": MiB, "4MiB": 4 * MiB, "32MiB": 32 * MiB}


def _timed(op: Callable[[bytes], object], keys: list[bytes], rounds: int) -> tuple[list[float], float]:
    """Per-call latencies of ``op`` over ``keys`` ``rounds`` times, and the wall time."""
    out: list[float] = []
    start = time.perf_counter()
    for _ in range(rounds):
        for k in keys:
            t = time.perf_counter()
            op(k)
            out.append(time.perf_counter() - t)
    return out, time.perf_counter() - start


def _worker(task: dict[str, Any]) -> dict[str, Any]:
    """Runs in a client process: put ``n`` values, then get each back ``rounds`` times."""
    size, n, rounds, path, prefix = task["size"], task["n"], task["rounds"], task["path"], task["prefix"]
    value = np.random.default_rng(task["seed"]).integers(0, 256, size, dtype=np.uint8).tobytes()
    keys = [f"{prefix}-{i}".encode() for i in range(n)]

    def check(got: Any) -> None:  # a benchmark that silently missed would measure nothing
        if got is None or (len(got) if not isinstance(got, int) else got) != size:
            raise AssertionError(f"{path}: wrong or missing value ({got!r:.40})")

    into: list[float] = []
    if path == "redis":
        import redis

        r = redis.Redis(port=task["port"])
        r.ping()
        puts, _ = _timed(lambda k: r.set(k, value), keys, 1)
        gets, wall = _timed(lambda k: check(r.get(k)), keys, rounds)
        r.delete(*keys)
    else:
        from kvstore.client import Client

        with Client(task["master"], same_host=(path != "kvstore-tcp"), timeout=60,
                    cache_locations=(path == "kvstore-cached")) as c:
            puts, _ = _timed(lambda k: c.put(k, value), keys, 1)
            gets, wall = _timed(lambda k: check(c.get(k)), keys, rounds)
            # get_into: into a buffer the caller reuses (what an engine does; no fresh-page faults)
            buf = np.zeros(size, dtype=np.uint8)
            into, _ = _timed(lambda k: check(c.get_into(k, buf)), keys, rounds)
            c.remove_batch(keys, force=True)
    return {"puts": puts, "gets": gets, "get_wall": wall, "get_bytes": size * len(gets), "get_into": into}


def _prefix_rate(master: str, seconds: float) -> float:
    from kvstore.client import Client

    keys = [b"lp-%06d" % i for i in range(1000)]
    with Client(master, timeout=60) as c:
        for i in range(0, 1000, 250):
            c.put_batch([(k, b"x") for k in keys[i:i + 250]])
        assert c.longest_prefix(keys) == 1000
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            c.longest_prefix(keys)
            n += 1
        rate = n * len(keys) / (time.perf_counter() - start)
        c.remove_batch(keys, force=True)
    return rate


def _memcpy(size: int, repeat: int) -> float:
    src = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t = time.perf_counter()
    for _ in range(repeat):
        np.copyto(dst, src)
    return size * repeat / (time.perf_counter() - t) / 1e9


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} not open")


def _wait_node(master: str, timeout: float = 60) -> None:
    from kvstore.client import Client

    deadline = time.monotonic() + timeout
    with Client(master, timeout=10) as c:
        while not c.stats().nodes:
            if time.monotonic() > deadline:
                raise TimeoutError("the node of kvstore up did not register")
            time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer operations (about a minute)")
    ap.add_argument("--json", help="write results to this JSON file")
    args = ap.parse_args()
    ops = {"1MiB": (16, 3), "4MiB": (8, 3), "32MiB": (3, 2)} if args.quick else \
        {"1MiB": (64, 5), "4MiB": (32, 5), "32MiB": (8, 4)}

    tmp = Path(tempfile.mkdtemp(prefix="kvbench-store-"))
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {"runs": {}, "limits": {}}
    try:
        port = free_port()
        up = _start([*CLI, "up", "--port", str(port), "--data-dir", str(tmp / "kv"), "--dram", "2GiB",
                     "--disk", "0", "--metrics-port", "-1"], tmp / "up.log")
        procs.append(up)
        master = f"127.0.0.1:{port}"
        _wait_port(port, up, tmp / "up.log")
        paths = ["kvstore", "kvstore-cached", "kvstore-tcp"]
        redis_port = free_port()
        if shutil.which("redis-server"):
            rs = _start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--protected-mode", "yes"], tmp / "redis.log")
            procs.append(rs)
            _wait_port(redis_port, rs, tmp / "redis.log")
            paths.append("redis")
        else:
            print("redis-server not installed (make bench installs it): Redis columns skipped")
        _wait_node(master)
        ctx = mp.get_context("spawn")
        with ctx.Pool(4) as pool:
            pool.map(_worker, [{"size": 1024, "n": 1, "rounds": 1, "path": "kvstore", "prefix": f"warm{i}",
                                "seed": i, "master": master, "port": redis_port} for i in range(4)])
            rows = []
            for name, size in SIZES.items():
                results["limits"][name] = {"memcpy_gbps": _memcpy(size, 20 if size < 32 * MiB else 5)}
                for clients in (1, 4):
                    for path in paths:
                        n, rounds = ops[name]
                        tasks = [{"size": size, "n": n, "rounds": rounds, "path": path, "seed": i,
                                  "prefix": f"{path}-{name}-{clients}-{i}", "master": master,
                                  "port": redis_port} for i in range(clients)]
                        outs = pool.map(_worker, tasks)
                        gets = [x for o in outs for x in o["gets"]]
                        puts = [x for o in outs for x in o["puts"]]
                        wall = max(o["get_wall"] for o in outs)
                        total = sum(o["get_bytes"] for o in outs)
                        r = {"get": summarize(gets, size), "put": summarize(puts, size),
                             "get_aggregate_gbps": total / wall / 1e9}
                        intos = [x for o in outs for x in o["get_into"]]
                        if intos:
                            r["get_into"] = summarize(intos, size)
                        results["runs"][f"{path}/{name}/{clients}"] = r
                        rows.append({"path": path, "size": name, "clients": clients,
                                     "get_GBps": r["get_aggregate_gbps"], "get_p50_ms": r["get"]["p50_us"] / 1e3,
                                     "get_p99_ms": r["get"]["p99_us"] / 1e3,
                                     "get_into_GBps": r["get_into"]["gbps"] * clients if intos else None,
                                     "get_into_p50_ms": r["get_into"]["p50_us"] / 1e3 if intos else None,
                                     "put_GBps": r["put"]["gbps"] * clients,
                                     "put_p50_ms": r["put"]["p50_us"] / 1e3,
                                     "memcpy_GBps": results["limits"][name]["memcpy_gbps"]})
        print_table("Pooled store vs Redis (get: aggregate GB/s over all clients)", rows,
                    ["path", "size", "clients", "get_GBps", "get_p50_ms", "get_p99_ms", "get_into_GBps",
                     "get_into_p50_ms", "put_GBps",
                     "put_p50_ms", "memcpy_GBps"])
        rate = _prefix_rate(master, 1.0 if args.quick else 3.0)
        print(f"\nLongestPrefix (batches of 1000 keys): {rate:,.0f} keys/s")
        runs = results["runs"]
        ratios = {
            # Both copy into memory that already exists (get_into a reused buffer vs memcpy).
            "get_samehost_vs_memcpy_32MiB": runs["kvstore/32MiB/1"]["get_into"]["gbps"]
            / results["limits"]["32MiB"]["memcpy_gbps"],
            "get_new_buffer_samehost_vs_memcpy_32MiB": runs["kvstore/32MiB/1"]["get_aggregate_gbps"]
            / results["limits"]["32MiB"]["memcpy_gbps"],
            "longest_prefix_keys_per_s": rate,
        }
        if "redis" in paths:
            for name in SIZES:
                ratios[f"get_vs_redis_{name}"] = (runs[f"kvstore/{name}/1"]["get_aggregate_gbps"]
                                                  / runs[f"redis/{name}/1"]["get_aggregate_gbps"])
                ratios[f"get_tcp_vs_redis_{name}"] = (runs[f"kvstore-tcp/{name}/1"]["get_aggregate_gbps"]
                                                      / runs[f"redis/{name}/1"]["get_aggregate_gbps"])
            ratios["get_vs_redis_4MiB_4clients"] = (runs["kvstore/4MiB/4"]["get_aggregate_gbps"]
                                                    / runs["redis/4MiB/4"]["get_aggregate_gbps"])
            ratios["get_cached_vs_redis_4MiB"] = (runs["kvstore-cached/4MiB/1"]["get_aggregate_gbps"]
                                                  / runs["redis/4MiB/1"]["get_aggregate_gbps"])
        results["ratios"] = ratios
        print("\nratios")
        for k, v in ratios.items():
            print(f"  {k:<34} {v:,.2f}")
        write_json(args.json, results)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
                p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
