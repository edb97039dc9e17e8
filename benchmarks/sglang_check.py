"""GPU-host check of the SGLang backend: two SGLang servers sharing prefixes through kvstore.

SGLang's server cannot run on the CPU-only machines this project is built on (its
CPU engine needs sgl-kernel's CPU build, which PyPI does not ship), so this is the
one-command check for a GPU host with SGLang installed (``pip install
'kvstore[sglang]'``). It starts ``kvstore up`` (unless ``--master`` is given), then
for each mode -- ``l3`` (HiCache with the kvstore backend) and ``none`` (HiCache
without L3) -- two servers on the same model, sends a shared-prefix workload to
server A, then the same prompts to server B, and reports B's prefix hit rate
(``cached_tokens`` / prompt tokens, from SGLang's ``meta_info``) and time to first
token::

    python benchmarks/sglang_check.py --model /models/Llama-3.1-8B-Instruct --json sglang_check.json

Each server gets ``--mem-fraction-static`` 0.35 so both fit on one GPU; pass
``--gpus 0,1`` to put them on two.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def _server(model: str, port: int, gpu: str, master: str | None, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--host", "127.0.0.1",
            "--port", str(port), "--mem-fraction-static", "0.35", "--enable-hierarchical-cache",
            "--page-size", "64"]
    if master:
        extra = {"backend_name": "kvstore", "module_path": "connectors.sglang",
                 "class_name": "KVStoreHiCacheStorage", "interface_v1": 1, "master": master}
        args += ["--hicache-storage-backend", "dynamic", "--hicache-storage-backend-extra-config", json.dumps(extra)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)


def _generate(port: int, ids: list[int]) -> tuple[float, int]:
    """(seconds to the first streamed token, cached prompt tokens)."""
    body = json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0},
                       "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, cached = None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            first = first or time.perf_counter() - t0
            cached = int(json.loads(line[5:]).get("meta_info", {}).get("cached_tokens", cached))
    return first or time.perf_counter() - t0, cached


def run(a: argparse.Namespace, master: str | None, workdir: Path) -> dict[str, Any]:
    rng = random.Random(0)
    shared = [rng.randrange(100, 20000) for _ in range(a.prefix)]
    prompts = [shared + [rng.randrange(100, 20000) for _ in range(a.suffix)] for _ in range(a.prompts)]
    gpus = (a.gpus.split(",") * 2)[:2]
    out: dict[str, Any] = {}
    for mode in ("none", "l3"):
        ports = [_port(), _port()]
        procs = [_server(a.model, p, g, master if mode == "l3" else None, workdir / f"{mode}-{i}.log")
                 for i, (p, g) in enumerate(zip(ports, gpus, strict=True))]
        try:
            for p, proc in zip(ports, procs, strict=True):
                _wait_http(f"http://127.0.0.1:{p}/health", 900, proc)
            for ids in prompts:  # server A computes (and, with l3, stores) every prompt
                _generate(ports[0], ids)
            time.sleep(a.settle)  # let A's write-back reach the pool
            ttft, hits = [], []
            for ids in prompts:
                t, cached = _generate(ports[1], ids)
                ttft.append(t)
                hits.append(cached / len(ids))
            out[mode] = {"ttft_p50_s": round(statistics.median(ttft), 4), "hit_rate": round(statistics.mean(hits), 3)}
            print(f"{mode:>5}: server B hit rate {out[mode]['hit_rate']:.2f}, TTFT p50 "
                  f"{out[mode]['ttft_p50_s'] * 1e3:.0f} ms", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(60)
    out["ratios"] = {"ttft_p50_none_over_l3": round(out["none"]["ttft_p50_s"] / out["l3"]["ttft_p50_s"], 2),
                     "hit_rate_l3": out["l3"]["hit_rate"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model path for sglang.launch_server")
    ap.add_argument("--master", default=None, help="use this kvstore master instead of starting `kvstore up`")
    ap.add_argument("--gpus", default="0", help="CUDA devices of server A and B, e.g. 0,1 (default: both on 0)")
    ap.add_argument("--prompts", type=int, default=16, help="prompts in the workload")
    ap.add_argument("--prefix", type=int, default=4096, help="shared prefix tokens")
    ap.add_argument("--suffix", type=int, default=256, help="distinct tokens per prompt")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between server A's and B's turns")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    a = ap.parse_args()
    workdir = Path(f"sglang-check-{int(time.time())}")
    workdir.mkdir()
    up = None
    master = a.master
    if master is None:
        port = _port()
        master = f"127.0.0.1:{port}"
        up = subprocess.Popen([sys.executable, "-m", "kvstore", "up", "--port", str(port), "--dram", "16GiB",
                               "--data-dir", str(workdir / "kvstore")],
                              stdout=open(workdir / "kvstore.log", "ab"), stderr=subprocess.STDOUT)
        time.sleep(3)
    try:
        res = run(a, master, workdir)
    finally:
        if up is not None:
            up.terminate()
            up.wait(30)
    print("ratios:", json.dumps(res["ratios"]))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
