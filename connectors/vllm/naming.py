"""Key namespace and object keys of the vLLM connector (shared by both sides).

Each chunk is one object under its chunk key, layer-major: layer ``l`` is a
byte range of it, so a load reads "layer ``l`` of these chunks" as ranged reads
and hands it to the engine before layer ``l + 1`` has arrived. Blocks are moved
in the kernels' ``"raw"`` format (vLLM's CPU blocks are opaque), so the raw
layout fingerprint and the block size are part of the namespace's model string.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from connectors.vllm.metadata import KVStoreHandshake
from kvstore.keys import Namespace, chunk_keys, extra_digest
from kvstore.layout import KVLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.request import Request

# Fields of the model's HF config that change the KV a prompt produces (besides the
# weights, which the model path + revision name, and the shapes, which the layout does).
_KV_CONFIG_FIELDS = ("model_type", "architectures", "rope_scaling", "rope_parameters", "rope_theta",
                     "partial_rotary_factor", "sliding_window", "max_position_embeddings",
                     "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                     "attention_bias", "rms_norm_eps", "hidden_act", "vocab_size", "tie_word_embeddings")


def model_identity(vllm_config: VllmConfig) -> str:
    """What, besides the path, makes one engine's KV differ from another's for the same
    tokens: weights revision, quantization, compute dtype, ``kv_cache_dtype`` and the
    config fields above. A short hex digest (the namespace's model string carries it)."""
    mc, cc = vllm_config.model_config, vllm_config.cache_config
    hf = getattr(mc, "hf_config", None)
    fields: dict[str, Any] = {
        "revision": getattr(mc, "revision", None), "quantization": getattr(mc, "quantization", None),
        "dtype": str(getattr(mc, "dtype", "")), "kv_cache_dtype": str(getattr(cc, "cache_dtype", "auto")),
        "hf": {f: getattr(hf, f, None) for f in _KV_CONFIG_FIELDS} if hf is not None else None,
    }
    raw = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def stage_identity(layer_names: Sequence[str], pp_rank: int, pp_size: int) -> str:
    """The pipeline stage and the layers it holds (PP stages of equal shape never share keys)."""
    raw = "\x00".join(layer_names).encode()
    return f"pp={pp_rank}/{pp_size}:{hashlib.sha256(raw).hexdigest()[:16]}"


def namespace_model(model_id: str, raw_fingerprint: str, block_size: int, identity: str = "",
                    stage: str = "") -> str:
    """The namespace's model string: caches differing in any part never share keys."""
    out = f"{model_id}|vllm-raw={raw_fingerprint}|block={block_size}"
    if identity:
        out += f"|id={identity}"
    if stage:
        out += f"|{stage}"
    return out


class RefusedRequest(Exception):
    """A request the connector neither loads nor saves (its KV is not a function of token ids)."""


def chunk_extras(request: Request, chunk_tokens: int, n_chunks: int) -> list[bytes]:
    """Per-chunk extra identity of ``request`` for its first ``n_chunks`` chunks: vLLM's own
    prefix-cache extra keys (LoRA name and path, multimodal item hashes with their
    offsets, cache salt) over each chunk's token range, as :func:`extra_digest` values.

    Raises :class:`RefusedRequest` for prompt embeddings (no token ids to key on).
    """
    if getattr(request, "prompt_embeds", None) is not None:
        raise RefusedRequest("prompt embeddings")
    if not getattr(request, "lora_request", None) and not getattr(request, "mm_features", None):
        return []  # the cache salt is in the namespace root already
    from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys

    out, mm_idx = [], 0
    for c in range(n_chunks):
        extra, mm_idx = generate_block_hash_extra_keys(request, c * chunk_tokens, (c + 1) * chunk_tokens, mm_idx)
        out.append(extra_digest(extra))
    return out


def namespace(hs: KVStoreHandshake, chunk_tokens: int, cache_salt: str | None) -> Namespace:
    layout = KVLayout(num_layers=hs.num_layers, num_kv_heads=hs.num_kv_heads, head_dim=hs.head_dim,
                      dtype=hs.dtype, chunk_tokens=chunk_tokens, kind="mla" if hs.kind == "mla" else "kv")
    return Namespace(model=hs.model, layout=layout, tp_rank=hs.tp_rank, tp_size=hs.tp_size,
                     cache_salt=cache_salt or "")


def keys_for(ns: Namespace, tokens: Sequence[int], extras: Sequence[bytes] | None = None) -> list[bytes]:
    """Chunk keys of the full chunks of ``tokens`` (``extras``: :func:`chunk_extras`)."""
    return chunk_keys(ns, list(tokens), extras=extras)
