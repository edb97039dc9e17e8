"""P/D handoff through kvstore vs recompute vs vLLM's ExampleConnector (real vLLM on CPU).

For each prompt length: the decode side's time to first token when the prompt's
KV is loaded from kvstore vs recomputed, the floor (the same engine answering a
prompt whose KV is already in its own prefix cache: vLLM prefix caching, second
run of the prompt), the producer's prefill time with and without saving, and
vLLM's built-in ``ExampleConnector`` (safetensors files on local disk) on the
same prompts. Also how many objects the master holds per stored chunk. Every engine is a child process
(``connectors.testing.engine``); times are ``LLM.generate`` of one prompt with
``max_tokens=1`` after a warm-up, median of ``--repeat`` fresh prompts.

    python benchmarks/pd_handoff.py --quick --json bench-results/pd_handoff.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import plot_lines, png_for  # noqa: E402

from connectors.testing import TinyModelSpec, build_tiny_llama  # noqa: E402
from connectors.testing.engine import EngineProcess, kv_transfer_config  # noqa: E402
from kvstore.client import Client  # noqa: E402
from kvstore.errors import KVStoreError  # noqa: E402
from kvstore.testing.cluster import Cluster  # noqa: E402

SPEC = TinyModelSpec(layers=8, hidden=1024, heads=16, kv_heads=4, intermediate=2816, vocab=512,
                     max_positions=16384, seed=99)


def _prompts(seed: int, length: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 500) for _ in range(length)] for _ in range(n)]




def run(lengths: list[int], repeat: int, workdir: Path) -> dict[str, Any]:
    model = build_tiny_llama(workdir / "model", SPEC)
    max_len = max(lengths) + 256
    warm = _prompts(0, 300, 1)
    sets = {n: _prompts(n, n, repeat) for n in lengths}
    res: dict[str, Any] = {"model": SPEC.__dict__, "lengths": lengths, "repeat": repeat, "rows": []}
    times: dict[str, dict[int, list[float]]] = {}

    def phase(name: str, kv: dict[str, Any] | None, prompts_of: dict[int, list[list[int]]],
              params: dict[int, list[Any]] | None = None, again: str | None = None) -> dict[int, list[Any]]:
        """Time each prompt once in a fresh engine (and, with ``again``, a second time:
        the prompt's KV is then in the engine's own prefix cache)."""
        got: dict[int, list[Any]] = {}
        # Whole prompts in one step (no chunked prefill) for every engine: vLLM's ExampleConnector
        # saves per step and cannot reassemble a chunked prefill (it fails at 8192 tokens otherwise).
        with EngineProcess(model, kv=kv, log=workdir / f"{name}.log", max_model_len=max_len,
                           max_num_batched_tokens=max_len) as e:
            e.generate(warm, 1)
            names = [name] + ([again] if again else [])
            for k in names:
                times[k] = {}
            for n, ps in prompts_of.items():
                ts: dict[str, list[float]] = {k: [] for k in names}
                got[n] = []
                for i, p in enumerate(ps):
                    try:
                        for k in names:
                            r = e.generate([p], 1, params=[params[n][i]] if params else None)
                            ts[k].append(float(r["seconds"]))
                    except KVStoreError as err:  # a peer that fails at a length is reported, not fatal
                        res.setdefault("errors", {}).setdefault(name, {})[n] = str(err)
                        print(f"  {name} at {n} tokens failed: {err}", flush=True)
                        ts = {}
                        break
                    got[n].append(r["params"][0])
                for k, t in ts.items():
                    times[k][n] = t
            e.call("wait_idle")
        for k in names:
            print(f"  {k}: " + ", ".join(f"{n}={statistics.median(t) * 1e3:.0f}ms" for n, t in times[k].items()),
                  flush=True)
        return got

    with Cluster(workdir / "cluster", dram="2GiB").start(nodes=1) as cl:
        # plain engine: the prefill with no connector, then the same prompt from its prefix cache
        phase("recompute", None, sets, again="floor")
        params = phase("producer_save", kv_transfer_config(cl.master_address, "kv_producer"), sets)
        with Client(cl.master_address) as c:
            chunks = len(warm[0]) // 256 + sum(len(p) // 256 for ps in sets.values() for p in ps)
            res["master_objects"], res["stored_chunks"] = c.stats().objects, chunks
        phase("consumer_load", kv_transfer_config(cl.master_address, "kv_consumer"), sets, params)
        ex_dir = workdir / "example"
        ex_dir.mkdir()
        ex = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
              "kv_connector_extra_config": {"shared_storage_path": str(ex_dir)}}
        phase("example_save", ex, sets)
        phase("example_load", ex, sets)
    for n in lengths:
        med = {k: statistics.median(v[n]) for k, v in times.items() if n in v}
        res["rows"].append({"tokens": n, **{f"{k}_s": round(v, 4) for k, v in med.items()}})
    by = {r["tokens"]: r for r in res["rows"]}
    ref = 2048 if 2048 in by else lengths[-1]
    ratios: dict[str, float] = {
        "producer_save_overhead": round(by[ref]["producer_save_s"] / by[ref]["recompute_s"] - 1, 4),
        "master_objects_per_chunk": round(res["master_objects"] / max(res["stored_chunks"], 1), 3),
    }
    for n, row in by.items():
        if "consumer_load_s" not in row:
            continue
        ratios[f"load_vs_recompute_{n}"] = round(row["recompute_s"] / row["consumer_load_s"], 2)
        ratios[f"load_vs_floor_{n}"] = round(row["floor_s"] / row["consumer_load_s"], 2)
        if "example_load_s" in row:
            ratios[f"vs_example_connector_{n}"] = round(row["example_load_s"] / row["consumer_load_s"], 2)
    res["ratios"] = ratios
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2048 and 8192 tokens, 2 prompts each")
    ap.add_argument("--json", type=Path, default=None, help="write results here")
    ap.add_argument("--lengths", default=None, help="comma separated prompt lengths (default 512,2048,8192)")
    ap.add_argument("--repeat", type=int, default=None, help="prompts per length (median reported)")
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else ([2048, 8192] if a.quick else [512, 2048, 8192])
    repeat = a.repeat or (2 if a.quick else 3)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pd-bench-") as d:
        res = run(lengths, repeat, Path(d))
    res["wall_s"] = round(time.monotonic() - t0, 1)
    print(f"{'tokens':>7} {'recompute':>10} {'floor':>12} {'kvstore load':>13} {'prefill+save':>13} "
          f"{'Example save':>13} {'Example load':>13}")
    cols = ("recompute_s", "floor_s", "consumer_load_s", "producer_save_s", "example_save_s", "example_load_s")
    for r in res["rows"]:
        cells = [f"{r[c] * 1e3:>11.0f}ms" if c in r else f"{'failed':>13}" for c in cols]
        print(f"{r['tokens']:>7}" + "".join(cells))
    print("ratios:", json.dumps(res["ratios"]))
    toks = [str(r["tokens"]) for r in res["rows"]]
    plot_lines(png_for(a.json), "Time to first token on the decode side", "prompt tokens", "ms", toks, {
        name: [r[c] * 1e3 if c in r else None for r in res["rows"]]
        for name, c in (("recompute", "recompute_s"), ("floor (own prefix cache)", "floor_s"),
                        ("kvstore load", "consumer_load_s"), ("ExampleConnector load", "example_load_s"))},
        log_y=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
