"""Transfer-engine benchmark: every backend between two processes, next to its limits.

    python benchmarks/transport.py [--quick] [--json FILE] [--backends tcp,shm,ucx]

For each backend, size (64 KiB .. 256 MiB) and concurrency (1 and 4 streams)
a client process reads ``size`` bytes per batch from a serving process and
reports GB/s and p50/p99 batch latency. In the same run it measures the limits:
single-thread memcpy of the same sizes, a plain Python socket loopback
(``sendall``/``recv_into``, 4 MiB buffers) and, when ``nixl`` is installed,
NIXL's UCX backend moving the same sizes DRAM to DRAM between two processes
(READs over UCX's CMA transport, no busy-polling progress threads).
Also the layer-wise stream: time until the first layer is usable at the
consumer vs. the whole chunk. ``--json`` writes every number plus ``ratios``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transport.layerwise import LayerReceiver, LayerSender  # noqa: E402
from transport.regions import Desc, RemoteRegion  # noqa: E402
from transport.registry import create  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parent))
from _common import plot_lines, png_for  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
SIZES = [64 * KiB, 1 * MiB, 4 * MiB, 32 * MiB, 256 * MiB]
URIS = {"tcp": "tcp://127.0.0.1:0", "shm": "shm://bench", "ucx": "ucx://127.0.0.1:0?error_handling=0"}  # same host: lets UCX use shm/CMA


def _iters(size: int, quick: bool) -> int:
    budget = (192 if quick else 1024) * MiB
    return max(3 if quick else 5, min(200, budget // size))


def _stats(lat: list[float], nbytes: int, wall: float) -> dict[str, float]:
    lat = sorted(lat)
    return {
        "gbps": nbytes / wall / 1e9,
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
    }


# ---------------------------------------------------------------- serving process
def serve(uri: str, nbytes: int) -> None:
    t = create(uri)
    r = t.allocate(nbytes, name="bench-server")
    assert r.view is not None
    np.frombuffer(r.view, dtype=np.uint8)[:] = 1
    print(t.metadata().hex(), r.remote().to_bytes().hex(), flush=True)
    for line in sys.stdin:
        parts = line.split()
        if parts and parts[0] == "layers":
            rx = LayerReceiver(t, bytes.fromhex(parts[1]), int(parts[2]))
            rx.wait_layer(0, 30)
            first = time.time()
            for layer in range(1, int(parts[2])):
                rx.wait_layer(layer, 30)
            print(first, time.time(), flush=True)
    t.close()


def _line(proc: subprocess.Popen[str]) -> str:
    """Next protocol line of a child (UCX and NIXL log to stdout; skip their lines)."""
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line or not ("UCX " in line or "NIXL" in line or line.startswith("[")):
            if line.strip() or not line:
                return line


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


# ---------------------------------------------------------------- backends
def bench_backend(name: str, sizes: list[int], quick: bool) -> dict[str, Any]:
    biggest = max(sizes)
    proc = _spawn("--serve", URIS[name], str(4 * biggest))
    assert proc.stdout is not None and proc.stdin is not None
    meta_hex, region_hex = _line(proc).split()
    remote = RemoteRegion.from_bytes(bytes.fromhex(region_hex))
    t = create(URIS[name])
    out: dict[str, Any] = {}
    try:
        peer = t.connect(bytes.fromhex(meta_hex), timeout=30)
        local = t.allocate(4 * biggest, name="bench-client")
        for size in sizes:
            for streams in (1, 4):
                descs = [Desc(local, i * size, remote, i * size, size) for i in range(streams)]
                n = _iters(size, quick)
                for d in descs:  # warm-up: fault pages in, open connections
                    t.read(peer, [d], timeout=60).wait()
                lat: list[float] = []
                t0 = time.perf_counter()
                for _ in range(n):
                    hs = [t.read(peer, [d], timeout=60) for d in descs]
                    for h in hs:
                        h.wait()
                        assert h.finished is not None
                        lat.append(h.finished - h.started)
                wall = time.perf_counter() - t0
                out[f"{size}/{streams}"] = _stats(lat, n * streams * size, wall)
        out["layerwise"] = bench_layers(t, peer, local, remote, proc)
    finally:
        t.close()
        proc.stdin.close()
        proc.wait(30)
    return out


def bench_layers(t: Any, peer: Any, local: Any, remote: RemoteRegion, proc: Any) -> dict[str, float]:
    """Push 4 chunks x 32 layers (64 KiB each) layer by layer; consumer timings."""
    chunks, layers, per = 4, 32, 64 * KiB
    stream = os.urandom(16)

    def rng(c: int, layer: int) -> Desc:
        off = (layer * chunks + c) * per
        return Desc(local, off, remote, off, per)

    proc.stdin.write(f"layers {stream.hex()} {layers}\n")
    proc.stdin.flush()
    time.sleep(0.2)
    tx = LayerSender(t, peer, stream, chunks, layers, rng, max_in_flight=64 * MiB)
    t0 = time.time()  # same host: wall clocks agree across the two processes
    for layer in range(layers):
        for c in range(chunks):
            tx.publish(c, layer)
    tx.finish(30)
    first, whole = (float(x) - t0 for x in _line(proc).split())
    return {"first_layer_ms": first * 1e3, "all_layers_ms": whole * 1e3,
            "bytes": chunks * layers * per}


# ---------------------------------------------------------------- limits
def bench_memcpy(sizes: list[int], quick: bool) -> dict[str, Any]:
    out = {}
    for size in sizes:
        a = np.ones(size, dtype=np.uint8)
        b = np.zeros(size, dtype=np.uint8)
        np.copyto(b, a)
        n = _iters(size, quick)
        lat = []
        t0 = time.perf_counter()
        for _ in range(n):
            s = time.perf_counter()
            np.copyto(b, a)
            lat.append(time.perf_counter() - s)
        out[f"{size}/1"] = _stats(lat, n * size, time.perf_counter() - t0)
    return out


def sock_serve() -> None:
    lsock = socket.create_server(("127.0.0.1", 0))
    print(lsock.getsockname()[1], flush=True)
    conn, _ = lsock.accept()
    buf = memoryview(np.ones(4 * MiB, dtype=np.uint8))
    req = bytearray(8)
    while conn.recv_into(req, 8) == 8:
        left = int.from_bytes(req, "little")
        while left:
            k = min(left, len(buf))
            conn.sendall(buf[:k])
            left -= k


def bench_socket(sizes: list[int], quick: bool) -> dict[str, Any]:
    proc = _spawn("--sock-serve")
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    s = socket.create_connection(("127.0.0.1", port))
    dst = memoryview(np.zeros(max(sizes), dtype=np.uint8))
    out = {}

    def one(size: int) -> None:
        s.sendall(size.to_bytes(8, "little"))
        pos = 0
        while pos < size:
            pos += s.recv_into(dst[pos : min(size, pos + 4 * MiB)])

    for size in sizes:
        one(size)
        n = _iters(size, quick)
        lat = []
        t0 = time.perf_counter()
        for _ in range(n):
            st = time.perf_counter()
            one(size)
            lat.append(time.perf_counter() - st)
        out[f"{size}/1"] = _stats(lat, n * size, time.perf_counter() - t0)
    s.close()
    proc.wait(30)
    return out


def bench_nixl(sizes: list[int], quick: bool) -> dict[str, Any] | None:
    """NIXL (UCX backend) reads DRAM->DRAM between two processes, or None if not installed."""
    if importlib.util.find_spec("nixl") is None:
        print("nixl not installed: skipping the NIXL baseline", file=sys.stderr)
        return None
    arg = ",".join(str(s) for s in sizes)
    target = _spawn("--nixl-target", str(max(sizes)))
    assert target.stdout is not None and target.stdin is not None
    meta_hex, addr = _line(target).split()
    res = subprocess.run([sys.executable, __file__, "--nixl-initiator", arg, "1" if quick else "0"],
                         input=f"{meta_hex} {addr}\n", capture_output=True, text=True, timeout=300)
    target.stdin.close()
    target.wait(30)
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            return dict(json.loads(line))
    print(f"nixl run failed (rc={res.returncode}): {res.stderr[-800:]}", file=sys.stderr)
    return None


def _nixl_agent(name: str) -> Any:
    """A NIXL agent with a UCX backend set up for two processes on one host."""
    from nixl._api import nixl_agent, nixl_agent_config  # noqa: PLC0415

    # No progress thread: the Python API runs it with a zero delay, so it busy-polls a whole
    # core per agent; the caller progresses UCX itself (check_xfer_state / get_new_notifs).
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[]))
    # Same host, no peer-failure handling needed: "none" lets UCX keep its shared-memory
    # lanes (sysv/posix, self) instead of falling back to tcp/lo; READs go over CMA either way.
    agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
    return agent


def nixl_target(nbytes: int) -> None:
    import select  # noqa: PLC0415

    agent = _nixl_agent("kvbench-target")
    buf = np.ones(nbytes, dtype=np.uint8)  # page-touched, like a filled KV cache
    agent.register_memory([(buf.ctypes.data, nbytes, 0, "")], "DRAM")
    print("\n" + agent.get_agent_metadata().hex(), buf.ctypes.data, flush=True)
    while True:  # passive side: progress UCX now and then (connection wire-up) until stdin closes
        if select.select([sys.stdin], [], [], 0.005)[0] and not sys.stdin.readline():
            break
        agent.get_new_notifs()
    sys.stdout.flush()
    os._exit(0)  # NIXL crashes in interpreter teardown; results are already out


def nixl_initiator(sizes: list[int], quick: bool) -> None:
    meta_hex, raddr = sys.stdin.readline().split()
    agent = _nixl_agent("kvbench-initiator")
    buf = np.zeros(max(sizes), dtype=np.uint8)
    buf.fill(0)  # fault the destination pages in before registering
    agent.register_memory([(buf.ctypes.data, buf.size, 0, "")], "DRAM")
    name = agent.add_remote_agent(bytes.fromhex(meta_hex))
    out = {}
    for size in sizes:
        local = agent.get_xfer_descs([(buf.ctypes.data, size, 0)], "DRAM")
        remote = agent.get_xfer_descs([(int(raddr), size, 0)], "DRAM")
        h = None
        while h is None:  # the remote metadata may still be loading
            try:
                h = agent.initialize_xfer("READ", local, remote, name)
            except Exception:  # noqa: BLE001 - nixl raises its own status types
                time.sleep(0.01)

        def once(h: Any = h) -> float:
            st = time.perf_counter()
            state = agent.transfer(h)
            while state not in ("DONE", "ERR"):  # without a progress thread this also progresses UCX
                state = agent.check_xfer_state(h)
            if state == "ERR":
                raise RuntimeError("nixl transfer failed")
            return time.perf_counter() - st

        once()
        n = _iters(size, quick)
        t0 = time.perf_counter()
        lat = [once() for _ in range(n)]
        out[f"{size}/1"] = _stats(lat, n * size, time.perf_counter() - t0)
    print(json.dumps(out), flush=True)
    os._exit(0)  # NIXL crashes in interpreter teardown; results are already out


# ---------------------------------------------------------------- report
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations and no 256 MiB (< 1 min)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--backends", default="tcp,shm,ucx")
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--sock-serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--nixl-target", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--nixl-initiator", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.nixl_target:
        nixl_target(args.nixl_target)
        return
    if args.nixl_initiator:
        nixl_initiator([int(x) for x in args.nixl_initiator[0].split(",")], args.nixl_initiator[1] == "1")
        return
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    if args.sock_serve:
        sock_serve()
        return
    sizes = SIZES[:-1] if args.quick else SIZES
    results: dict[str, Any] = {"sizes": sizes, "quick": args.quick, "backends": {}}
    results["memcpy"] = bench_memcpy(sizes, args.quick)
    results["socket"] = bench_socket(sizes, args.quick)
    for name in args.backends.split(","):
        if name == "ucx":
            try:
                import ucxx  # noqa: F401, PLC0415

                from transport.ucx import transport as _  # noqa: F401, PLC0415
            except ImportError as e:
                print(f"skipping ucx: {e}", file=sys.stderr)
                continue
        results["backends"][name] = bench_backend(name, sizes, args.quick)
    results["nixl"] = bench_nixl(sizes, args.quick)
    results["ratios"] = ratios(results)
    print_table(results)
    names = [f"{s >> 20}MiB" if s >= MiB else f"{s >> 10}KiB" for s in sizes]

    def line(d: dict[str, Any] | None) -> list[float | None]:
        return [None if not d or f"{s}/1" not in d else float(d[f"{s}/1"]["gbps"]) for s in sizes]

    plot_lines(png_for(args.json), "Transfer engine, one stream, DRAM to DRAM", "transfer size", "GB/s", names,
               {"memcpy": line(results["memcpy"]), "python socket": line(results["socket"]),
                **{f"{n}://": line(d) for n, d in results["backends"].items()}, "NIXL (UCX)": line(results["nixl"])})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def ratios(r: dict[str, Any]) -> dict[str, float | None]:
    k = f"{32 * MiB}/1"

    def g(d: dict[str, Any] | None, key: str = k) -> float | None:
        return None if not d or key not in d else float(d[key]["gbps"])

    b = r["backends"]
    out: dict[str, float | None] = {}
    shm, mc, tcp, so = g(b.get("shm")), g(r["memcpy"]), g(b.get("tcp")), g(r["socket"])
    out["shm_vs_memcpy_32MiB"] = shm / mc if shm and mc else None
    out["tcp_vs_socket_32MiB"] = tcp / so if tcp and so else None
    same_host = [x for x in (g(b.get("shm")), g(b.get("ucx")), g(b.get("shm"), f"{32 * MiB}/4"),
                             g(b.get("ucx"), f"{32 * MiB}/4")) if x]
    nx = g(r.get("nixl"))
    out["best_vs_nixl_32MiB"] = max(same_host) / nx if same_host and nx else None
    for name, d in b.items():
        lw = d.get("layerwise")
        if lw:
            out[f"{name}_first_layer_vs_whole"] = lw["first_layer_ms"] / lw["all_layers_ms"]
    return out


def print_table(r: dict[str, Any]) -> None:
    rows = [("memcpy (1 thread)", r["memcpy"]), ("python socket", r["socket"])]
    rows += [(f"{n}://", d) for n, d in r["backends"].items()]
    if r.get("nixl"):
        rows.append(("nixl UCX", r["nixl"]))
    print(f"{'path':<18} {'size':>8} {'str':>3} {'GB/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for name, d in rows:
        for size in r["sizes"]:
            for streams in (1, 4):
                v = d.get(f"{size}/{streams}")
                if v:
                    label = f"{size // MiB}M" if size >= MiB else f"{size // KiB}K"
                    print(f"{name:<18} {label:>8} {streams:>3} {v['gbps']:>7.2f} "
                          f"{v['p50_ms']:>8.3f} {v['p99_ms']:>8.3f}")
    for n, d in r["backends"].items():
        lw = d.get("layerwise")
        if lw:
            print(f"{n}:// layer-wise {lw['bytes'] // MiB} MiB: first layer {lw['first_layer_ms']:.2f} ms, "
                  f"all layers {lw['all_layers_ms']:.2f} ms")
    for k, v in r["ratios"].items():
        print(f"{k}: {'n/a' if v is None else f'{v:.2f}'}")


if __name__ == "__main__":
    main()
