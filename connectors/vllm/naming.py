"""Key namespace and object keys of the vLLM connector (shared by both sides).

Each chunk is one object under its chunk key, layer-major: layer ``l`` is a
byte range of it, so a load reads "layer ``l`` of these chunks" as ranged reads
and hands it to the engine before layer ``l + 1`` has arrived. Blocks are moved
in the kernels' ``"raw"`` format (vLLM's CPU blocks are opaque), so the raw
layout fingerprint and the block size are part of the namespace's model string.
"""

from __future__ import annotations

from collections.abc import Sequence

from connectors.vllm.metadata import KVStoreHandshake
from kvstore.keys import Namespace, chunk_keys
from kvstore.layout import KVLayout


def namespace_model(model_id: str, raw_fingerprint: str, block_size: int) -> str:
    """The namespace's model string: caches differing in any part never share keys."""
    return f"{model_id}|vllm-raw={raw_fingerprint}|block={block_size}"


def namespace(hs: KVStoreHandshake, chunk_tokens: int, cache_salt: str | None) -> Namespace:
    layout = KVLayout(num_layers=hs.num_layers, num_kv_heads=hs.num_kv_heads, head_dim=hs.head_dim,
                      dtype=hs.dtype, chunk_tokens=chunk_tokens, kind="mla" if hs.kind == "mla" else "kv")
    return Namespace(model=hs.model, layout=layout, tp_rank=hs.tp_rank, tp_size=hs.tp_size,
                     cache_salt=cache_salt or "")


def keys_for(ns: Namespace, tokens: Sequence[int]) -> list[bytes]:
    """Chunk keys of the full chunks of ``tokens``."""
    return chunk_keys(ns, list(tokens))
