"""Cache-aware routing: ``kvstore proxy --policy`` round_robin vs prefix vs prefix_load.

Two prefill (``kv_producer``) and one decode (``kv_consumer``) vLLM CPU servers behind
``kvstore proxy``, all on one kvstore pool, and a multi-turn chat workload: 8
conversations x 4 turns, each turn extending the previous prompt (the answer and the
next question), after a system prompt the conversations share; the turns of a round
arrive in a random order, four conversations in flight at a time. Each policy runs on its own conversations and system prompt (so no
policy profits from another's cache), restarting only the proxy. Measured per policy:
the prefill servers' prefix-cache hit rate (cached / prompt tokens from their
``usage``, ``--enable-prompt-tokens-details``) and the time to the first token of each
request through the proxy (``max_tokens=1``: prefill leg, then the decode leg's first
token). ``prefix_events`` is ``prefix`` routing by the prefill servers' own KV events
(``--engine-events``) rather than the proxy's history. Beside it, the pool's event lag: put acknowledged -> its ``STORED`` event
received by a ``watch_events`` subscriber.

    python benchmarks/routing.py --quick --json bench-results/routing.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import plot_lines, png_for, print_ratios, print_table, write_json  # noqa: E402

from connectors.testing import TinyModelSpec, build_tiny_llama  # noqa: E402
from connectors.testing.engine import kv_transfer_config  # noqa: E402
from connectors.testing.servers import post, start, stop, vllm_server, wait_http  # noqa: E402
from kvstore.testing.cluster import Cluster, free_port  # noqa: E402
from kvstore.testing.prometheus import sample_sum  # noqa: E402

SPEC = TinyModelSpec(layers=4, hidden=512, heads=8, kv_heads=4, intermediate=1408, vocab=512,
                     max_positions=4096, seed=7)
POLICIES = ("round_robin", "prefix", "prefix_load", "prefix_events")
"""``prefix_events``: ``--policy prefix`` routing by the prefill servers' own KV events
(``--engine-events``) instead of the proxy's history."""


def _workload(seed: int, convs: int, turns: int, system: int, turn_tokens: int) -> list[list[list[int]]]:
    """Per conversation, the prompt of each turn (each extends the one before)."""
    rng = random.Random(seed)
    shared = [rng.randrange(2, 500) for _ in range(system)]
    out = []
    for _ in range(convs):
        prompt, mine = list(shared), []
        for _ in range(turns):
            prompt = prompt + [rng.randrange(2, 500) for _ in range(turn_tokens)]
            mine.append(prompt)
        out.append(mine)
    return out


def _run_policy(name: str, model: Path, prefill: list[str], decode: str, workdir: Path, seed: int,
                convs: int, turns: int, system: int, turn_tokens: int, parallel: int,
                feeds: list[str]) -> dict[str, Any]:
    port = free_port()
    policy = "prefix" if name == "prefix_events" else name
    events = [a for u, f in zip(prefill, feeds, strict=True) for a in ("--engine-events", f"{u}={f}")] \
        if name == "prefix_events" else []
    proxy = start([sys.executable, "-c", "from kvstore.cli import main; main()", "proxy",
                   *(a for u in prefill for a in ("--prefill", u)), "--decode", decode, "--policy", policy,
                   *events, "--events-topic", "kv", "--kv-block-size", "32",
                   "--port", str(port)], workdir / f"proxy-{name}.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", [proxy], timeout=60)
        url = f"http://127.0.0.1:{port}/v1/completions"
        work = _workload(seed, convs, turns, system, turn_tokens)
        ttft: list[float] = []
        lock = threading.Lock()

        def one(prompt: list[int]) -> None:
            t = time.perf_counter()
            post(url, {"model": str(model), "prompt": prompt, "max_tokens": 1, "temperature": 0})
            with lock:
                ttft.append(time.perf_counter() - t)

        order = random.Random(seed)
        with ThreadPoolExecutor(parallel) as pool:
            for turn in range(turns):  # every conversation's turn t before any turn t + 1,
                batch = [c[turn] for c in work]  # arriving in no particular order
                order.shuffle(batch)
                list(pool.map(one, batch))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        stop(proxy)
    cached = sample_sum(text, "kvstore_proxy_prefill_cached_tokens_total")
    prompt_tokens = sample_sum(text, "kvstore_proxy_prefill_prompt_tokens_total")
    return {"policy": name, "requests": len(ttft), "hit_rate": cached / max(prompt_tokens, 1),
            "ttft_p50_ms": statistics.median(ttft) * 1e3,
            "ttft_p90_ms": sorted(ttft)[int(0.9 * (len(ttft) - 1))] * 1e3,
            "predicted_hit_blocks": sample_sum(text, "kvstore_proxy_predicted_hit_blocks_total"),
            "prompt_blocks": sample_sum(text, "kvstore_proxy_prompt_blocks_total")}


def _event_lag(master: str, n: int) -> float:
    """p50 ms from a put's acknowledgement to its STORED event at a subscriber."""
    from kvstore.client import Client
    from kvstore.v1 import master_pb2 as mpb

    seen: dict[bytes, float] = {}
    ready = threading.Event()

    def watch() -> None:
        with Client(master) as w:
            stream = w.watch_events(from_now=True, timeout=60)
            ready.set()
            for ev in stream:
                if ev.kind == mpb.PoolEvent.STORED and ev.key.startswith(b"lag-"):
                    seen.setdefault(bytes(ev.key), time.perf_counter())
                    if len(seen) >= n:
                        return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    ready.wait(10)
    time.sleep(0.5)  # the subscription is open on the master
    acked: dict[bytes, float] = {}
    with Client(master) as c:
        for i in range(n):
            key = f"lag-{i}".encode()
            c.put(key, os.urandom(64 << 10))
            acked[key] = time.perf_counter()
            time.sleep(0.01)
    t.join(30)
    lags = [(seen[k] - acked[k]) * 1e3 for k in acked if k in seen]
    return statistics.median(lags) if lags else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter turns (a few minutes, servers included)")
    ap.add_argument("--json", help="write results to this JSON file")
    a = ap.parse_args()
    convs, turns, parallel = 8, 4, 4
    system, turn_tokens = (256, 128) if a.quick else (512, 256)
    results: dict[str, Any] = {"model": SPEC.__dict__, "conversations": convs, "turns": turns,
                               "system_tokens": system, "turn_tokens": turn_tokens, "rows": []}
    with tempfile.TemporaryDirectory(prefix="kvbench-routing-") as d:
        work = Path(d)
        model = build_tiny_llama(work / "model", SPEC)
        procs: list[subprocess.Popen[bytes]] = []
        with Cluster(work / "cluster", dram="1GiB").start(nodes=1) as cl:
            try:
                ports = [free_port() for _ in range(3)]
                feeds = [f"ipc://{work / f'p{i}.sock'}" for i in range(2)]
                for i, p in enumerate(ports[:2]):
                    ev = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": feeds[i], "topic": "kv"}
                    procs.append(vllm_server(model, p, work / f"prefill{i}.log",
                                             kv_transfer_config(cl.master_address, "kv_producer"),
                                             "--enable-prompt-tokens-details", "--kv-events-config", json.dumps(ev),
                                             max_model_len=4096))
                procs.append(vllm_server(model, ports[2], work / "decode.log",
                                         kv_transfer_config(cl.master_address, "kv_consumer"), max_model_len=4096))
                for p in ports:
                    wait_http(f"http://127.0.0.1:{p}/health", procs, timeout=600)
                urls = [f"http://127.0.0.1:{p}" for p in ports]
                for i, policy in enumerate(POLICIES):
                    row = _run_policy(policy, model, urls[:2], urls[2], work, 100 + i, convs, turns, system,
                                      turn_tokens, parallel, feeds)
                    results["rows"].append(row)
                    print(f"  {policy}: hit rate {row['hit_rate']:.2f}, TTFT p50 {row['ttft_p50_ms']:.0f} ms",
                          flush=True)
                results["event_lag_p50_ms"] = _event_lag(cl.master_address, 50)
            finally:
                for proc in procs:
                    stop(proc)
    by = {r["policy"]: r for r in results["rows"]}
    results["ratios"] = {
        "hit_rate_prefix_vs_round_robin": round(by["prefix"]["hit_rate"] / max(by["round_robin"]["hit_rate"], 1e-9), 2),
        "hit_rate_prefix_load_vs_round_robin": round(
            by["prefix_load"]["hit_rate"] / max(by["round_robin"]["hit_rate"], 1e-9), 2),
        "hit_rate_prefix_events_vs_round_robin": round(
            by["prefix_events"]["hit_rate"] / max(by["round_robin"]["hit_rate"], 1e-9), 2),
        "ttft_p50_round_robin_over_prefix": round(by["round_robin"]["ttft_p50_ms"] / by["prefix"]["ttft_p50_ms"], 2),
        "ttft_p50_round_robin_over_prefix_load": round(
            by["round_robin"]["ttft_p50_ms"] / by["prefix_load"]["ttft_p50_ms"], 2),
        "event_lag_p50_ms": round(results["event_lag_p50_ms"], 2),
    }
    print_table("Routing policies (2 prefill + 1 decode vLLM CPU servers, multi-turn)", results["rows"],
                ["policy", "requests", "hit_rate", "ttft_p50_ms", "ttft_p90_ms", "predicted_hit_blocks",
                 "prompt_blocks"])
    print_ratios(results["ratios"])
    plot_lines(png_for(a.json), "TTFT p50 by routing policy", "policy", "ms", list(POLICIES),
               {"ttft_p50": [by[p]["ttft_p50_ms"] for p in POLICIES]})
    write_json(a.json, results)


if __name__ == "__main__":
    main()
