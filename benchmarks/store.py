"""Pooled-store benchmark: kvstore (``kvstore up`` on loopback) vs Redis, Mooncake Store, memcpy.

Measured in one run, side by side, for 1, 4 and 32 MiB values with 1 and 4
client processes: put/get throughput and p50/p99 latency through

* kvstore, default client (same host: one-sided reads out of the node's mapped arena
  once the location is known; the client that put a key knows it),
* kvstore with the same-host path disabled (TCP),
* the same TCP path against a second ``kvstore up`` that requires a token
  (authentication on every listener; ``auth_overhead_get_4MiB`` compares them),
* and against a third one serving TLS (``kvstore up --tls-dir``; the client verifies
  the certificates; ``tls_tcp_vs_plain_tcp_32MiB`` compares throughput),
* Redis (Debian ``redis-server`` on loopback, no persistence; redis-py + hiredis),
* Mooncake Store over TCP with zero-copy registered buffers, when
  ``mooncake-transfer-engine-non-cuda`` is installed (``make bench`` installs it),

plus two physical limits of the same sizes: single-thread memcpy (sources
rotating over as many buffers as the get loop reads, so neither side is served
from a warm cache) and one loopback TCP stream between two processes (a plain
socket ``sendall`` answered into a reused buffer, 256 KiB per ``recv_into``: what
any TCP store's get or put can at most reach on this machine; at 32 MiB also the
same stream through Python's ``ssl``, the limit of the TLS row), and
batched ``LongestPrefix`` keys/s. ``get`` returns a new buffer (like Redis's
``GET``), so it pays for faulting in fresh pages; ``get_into`` reads into a
buffer the caller reuses (what an engine does) and is the one compared with
memcpy and with Mooncake's ``get_into``. Every client process first puts and gets
one value untimed (connections up, as in a serving engine), and each row is the
union of several passes that interleave the systems in a rotated order, so that a
noisy neighbour slows all of them alike.

    python benchmarks/store.py --quick --json bench-results/store.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import secrets
import shutil
import socket
import statistics
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
from _common import plot_lines, png_for, print_ratios, print_table, summarize, write_json  # noqa: E402

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
        r.set(f"{prefix}-warm", value)  # steady state: connections up before anything is timed
        check(r.get(f"{prefix}-warm"))
        puts, _ = _timed(lambda k: r.set(k, value), keys, 1)
        gets, wall = _timed(lambda k: check(r.get(k)), keys, rounds)
        r.delete(*keys, f"{prefix}-warm")
    elif path == "mooncake":
        from _mooncake import worker

        return worker(task)
    else:
        from kvstore.client import Client

        secured, tls = path == "kvstore-auth", path == "kvstore-tls"
        master = task["auth_master"] if secured else task["tls_master"] if tls else task["master"]
        with Client(master, same_host=path == "kvstore", token=task["token"] if secured else None,
                    tls_ca=task["tls_ca"] if tls else None, timeout=60) as c:
            c.put(f"{prefix}-warm", value)  # steady state: connections up before anything is timed
            check(c.get(f"{prefix}-warm"))
            puts, _ = _timed(lambda k: c.put(k, value), keys, 1)
            gets, wall = _timed(lambda k: check(c.get(k)), keys, rounds)
            # get_into: into a buffer the caller reuses (what an engine does; no fresh-page faults)
            buf = np.ones(size, dtype=np.uint8)  # touched, as an engine's buffers are (memcpy's too)
            into, _ = _timed(lambda k: check(c.get_into(k, buf)), keys, rounds)
            c.remove_batch([*keys, f"{prefix}-warm".encode()], force=True)
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


def _loopback_server(port: int, ready: Any, tls: dict[str, str] | None = None) -> None:
    """Serve ``size`` bytes (8-byte request) from a pre-touched buffer until the peer hangs up
    (over TLS with ``tls``'s server certificate, as ``kvstore.tls.server_context`` serves)."""
    srv = socket.create_server(("127.0.0.1", port))
    ready.set()
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        from kvstore.tls import server_context

        conn = server_context(tls["cert"], tls["key"]).wrap_socket(conn, server_side=True)
    src = np.random.default_rng(0).integers(0, 256, max(SIZES.values()), dtype=np.uint8)
    with conn:
        while (req := conn.recv(8)) and len(req) == 8:
            conn.sendall(memoryview(src)[: int.from_bytes(req, "little")])


def _loopback(size: int, calls: int, tls: dict[str, str] | None = None) -> float:
    """GB/s of one loopback TCP stream from another process into one reused buffer (median
    call); with ``tls`` (paths of ``kvstore.tls.make``), of one TLS stream through Python's
    ``ssl``, what kvstore's TLS path is built on."""
    port = free_port()
    ready = mp.get_context("spawn").Event()
    server = mp.get_context("spawn").Process(target=_loopback_server, args=(port, ready, tls), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise TimeoutError("loopback server did not start")
        dst = np.ones(size, dtype=np.uint8)
        view = memoryview(dst)
        times = []
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                from kvstore.tls import client_context

                s = client_context(tls["ca"]).wrap_socket(s, server_hostname="127.0.0.1")
            for _ in range(calls + 1):  # the first call warms the connection up
                t = time.perf_counter()
                s.sendall(size.to_bytes(8, "little"))
                pos = 0
                while pos < size:
                    got = s.recv_into(view[pos:min(pos + (256 << 10), size)])
                    if not got:
                        raise ConnectionError("loopback server went away")
                    pos += got
                times.append(time.perf_counter() - t)
        return size / sorted(times[1:])[calls // 2] / 1e9
    finally:
        server.join(10)
        if server.is_alive():
            server.kill()


def _memcpy(size: int, sources: int, rounds: int) -> float:
    """Single-thread memcpy into one reused buffer from ``sources`` rotating buffers."""
    srcs = [np.random.default_rng(i).integers(0, 256, size, dtype=np.uint8) for i in range(sources)]
    dst = np.empty_like(srcs[0])
    np.copyto(dst, srcs[0])
    t = time.perf_counter()
    for _ in range(rounds):
        for src in srcs:
            np.copyto(dst, src)
    return size * sources * rounds / (time.perf_counter() - t) / 1e9


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


def _wait_node(master: str, timeout: float = 60, token: str | None = None, tls_ca: str | None = None) -> None:
    from kvstore.client import Client
    from kvstore.errors import KVStoreError

    deadline = time.monotonic() + timeout
    with Client(master, timeout=10, token=token, tls_ca=tls_ca) as c:
        while True:
            try:
                if c.stats().nodes:
                    return
            except KVStoreError as e:  # still starting (a 2 GiB arena takes a moment)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the node of kvstore up did not register: {e}") from e
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
    passes = 3 if args.quick else 4

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
        paths = ["kvstore", "kvstore-tcp", "kvstore-auth", "kvstore-tls"]
        token = secrets.token_urlsafe(32)
        (tmp / "token").write_text(token)
        auth_port = free_port()
        secured = _start([*CLI, "up", "--port", str(auth_port), "--data-dir", str(tmp / "kv-auth"), "--dram",
                          "2GiB", "--disk", "0", "--metrics-port", "-1", "--token-file", str(tmp / "token")],
                         tmp / "up-auth.log")
        procs.append(secured)
        auth_master = f"127.0.0.1:{auth_port}"
        _wait_port(auth_port, secured, tmp / "up-auth.log")
        from kvstore.tls import make as make_tls

        tls_files = make_tls(tmp / "tls", [])
        tls_port = free_port()
        encrypted = _start([*CLI, "up", "--port", str(tls_port), "--data-dir", str(tmp / "kv-tls"), "--dram",
                            "2GiB", "--disk", "0", "--metrics-port", "-1", "--tls-dir", str(tmp)],
                           tmp / "up-tls.log")
        procs.append(encrypted)
        tls_master = f"127.0.0.1:{tls_port}"
        _wait_port(tls_port, encrypted, tmp / "up-tls.log")
        redis_port = free_port()
        if shutil.which("redis-server"):
            rs = _start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--protected-mode", "yes"], tmp / "redis.log")
            procs.append(rs)
            _wait_port(redis_port, rs, tmp / "redis.log")
            paths.append("redis")
        else:
            print("redis-server not installed (make bench installs it): Redis columns skipped")
        mooncake: dict[str, Any] = {}
        try:
            import _mooncake

            mc_proc, mooncake = _mooncake.start_master(tmp)
            procs.append(mc_proc)
            paths.append("mooncake")
        except (ImportError, RuntimeError) as e:
            print(f"Mooncake Store not available ({e}): Mooncake columns skipped")
        _wait_node(master)
        _wait_node(auth_master, token=token)
        _wait_node(tls_master, tls_ca=str(tls_files["ca"]))
        ctx = mp.get_context("spawn")
        with ctx.Pool(4) as pool:
            pool.map(_worker, [{"size": 1024, "n": 1, "rounds": 1, "path": "kvstore", "prefix": f"warm{i}",
                                "seed": i, "master": master, "port": redis_port} for i in range(4)])
            rows = []
            for name, size in SIZES.items():
                n, rounds = ops[name]
                memcpy, loopback, loopback_tls = [], [], []
                for clients in (1, 4):
                    outs_of: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
                    # Passes interleave the systems (in a rotated order), so that a noisy
                    # neighbour slows every system alike instead of whichever ran then.
                    for rep in range(passes):
                        if clients == 1:
                            memcpy.append(_memcpy(size, n, max(rounds, 3)))
                            loopback.append(_loopback(size, max(n * rounds, 8)))
                            if name == "32MiB":
                                loopback_tls.append(_loopback(size, max(n * rounds, 8),
                                                              {k: str(v) for k, v in tls_files.items()}))
                        for path in paths[rep % len(paths):] + paths[:rep % len(paths)]:
                            tasks = [{"size": size, "n": n, "rounds": rounds, "path": path, "seed": i,
                                      "prefix": f"{path}-{name}-{clients}-{rep}-{i}", "master": master,
                                      "auth_master": auth_master, "token": token,
                                      "tls_master": tls_master, "tls_ca": str(tls_files["ca"]),
                                      "port": redis_port, "mooncake": mooncake} for i in range(clients)]
                            outs_of[path] += pool.map(_worker, tasks)
                    results["limits"][name] = {"memcpy_gbps": statistics.median(memcpy),
                                               "loopback_tcp_gbps": statistics.median(loopback)}
                    if loopback_tls:
                        results["limits"][name]["loopback_tls_gbps"] = statistics.median(loopback_tls)
                    for path in paths:
                        outs = outs_of[path]
                        gets = [x for o in outs for x in o["gets"]]
                        puts = [x for o in outs for x in o["puts"]]
                        wall = sum(o["get_wall"] for o in outs) / clients  # the clients of a pass run at once
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
                                     "memcpy_GBps": results["limits"][name]["memcpy_gbps"],
                                     "tcp_GBps": results["limits"][name]["loopback_tcp_gbps"]})
        print_table("Pooled store vs Redis (get: aggregate GB/s over all clients)", rows,
                    ["path", "size", "clients", "get_GBps", "get_p50_ms", "get_p99_ms", "get_into_GBps",
                     "get_into_p50_ms", "put_GBps",
                     "put_p50_ms", "memcpy_GBps", "tcp_GBps"])
        rate = _prefix_rate(master, 1.0 if args.quick else 3.0)
        print(f"\nLongestPrefix (batches of 1000 keys): {rate:,.0f} keys/s")
        runs = results["runs"]
        ratios = _ratios(runs, results["limits"], paths)
        ratios["longest_prefix_keys_per_s"] = rate
        _plot(runs, paths, png_for(args.json))
        results["ratios"] = ratios
        print_ratios(ratios)
        write_json(args.json, results)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
                p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _ratios(runs: dict[str, Any], limits: dict[str, Any], paths: list[str]) -> dict[str, float]:
    """The ratios the hot-path work is judged by (issue text names them); > 1 favours kvstore."""
    def gbps(path: str, size: str, op: str = "get_into", clients: int = 1) -> float:
        return float(runs[f"{path}/{size}/{clients}"][op]["gbps"])

    def p50(path: str, size: str, op: str) -> float:
        return float(runs[f"{path}/{size}/1"][op]["p50_us"])

    out = {f"get_samehost_vs_memcpy_{s}": gbps("kvstore", s) / limits[s]["memcpy_gbps"] for s in ("4MiB", "32MiB")}
    out["get_new_buffer_samehost_vs_memcpy_32MiB"] = (runs["kvstore/32MiB/1"]["get_aggregate_gbps"]
                                                      / limits["32MiB"]["memcpy_gbps"])
    for s in SIZES:  # how close the TCP path comes to one plain loopback stream
        out[f"get_tcp_vs_loopback_{s}"] = gbps("kvstore-tcp", s) / limits[s]["loopback_tcp_gbps"]
    for s in ("4MiB", "32MiB"):
        out[f"put_tcp_vs_loopback_{s}"] = gbps("kvstore-tcp", s, "put") / limits[s]["loopback_tcp_gbps"]
    if "kvstore-auth" in paths:  # secured / open, same TCP path: p50 latency of a 4 MiB get
        out["auth_overhead_get_4MiB"] = p50("kvstore-auth", "4MiB", "get_into") / p50("kvstore-tcp", "4MiB", "get_into")
    if "kvstore-tls" in paths:
        out["tls_tcp_vs_plain_tcp_32MiB"] = gbps("kvstore-tls", "32MiB") / gbps("kvstore-tcp", "32MiB")
        out["tls_tcp_vs_plain_tcp_4MiB"] = gbps("kvstore-tls", "4MiB") / gbps("kvstore-tcp", "4MiB")
        if "loopback_tls_gbps" in limits["32MiB"]:  # how much of the TLS cost is Python's ssl itself
            out["loopback_tls_vs_loopback_tcp_32MiB"] = (limits["32MiB"]["loopback_tls_gbps"]
                                                         / limits["32MiB"]["loopback_tcp_gbps"])
            out["tls_tcp_vs_loopback_tls_32MiB"] = gbps("kvstore-tls", "32MiB") / limits["32MiB"]["loopback_tls_gbps"]
    if "redis" in paths:
        out["get_p50_redis_over_kvstore_1MiB"] = p50("redis", "1MiB", "get") / p50("kvstore", "1MiB", "get_into")
        out["get_vs_redis_4MiB_4clients"] = (runs["kvstore/4MiB/4"]["get_aggregate_gbps"]
                                             / runs["redis/4MiB/4"]["get_aggregate_gbps"])
        for s in SIZES:
            out[f"get_tcp_vs_redis_{s}"] = (runs[f"kvstore-tcp/{s}/1"]["get_aggregate_gbps"]
                                            / runs[f"redis/{s}/1"]["get_aggregate_gbps"])
    if "mooncake" in paths:
        for s in SIZES:
            out[f"get_tcp_vs_mooncake_{s}"] = gbps("kvstore-tcp", s) / gbps("mooncake", s)
            out[f"get_samehost_vs_mooncake_{s}"] = gbps("kvstore", s) / gbps("mooncake", s)
        for s in SIZES:
            out[f"mooncake_get_vs_loopback_{s}"] = gbps("mooncake", s) / limits[s]["loopback_tcp_gbps"]
        for s in ("4MiB", "32MiB"):
            out[f"put_tcp_vs_mooncake_{s}"] = gbps("kvstore-tcp", s, "put") / gbps("mooncake", s, "put")
    return out


def _plot(runs: dict[str, Any], paths: list[str], png: Path | None) -> None:
    """get throughput (1 client, into a reused buffer; Redis: GET) against size, one line per system."""
    series = {p: [runs[f"{p}/{s}/1"]["get" if p == "redis" else "get_into"]["gbps"] for s in SIZES] for p in paths}
    plot_lines(png, "Pooled store: get throughput, 1 client", "value size", "GB/s", list(SIZES), series)


if __name__ == "__main__":
    main()
