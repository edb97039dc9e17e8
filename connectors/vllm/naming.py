"""Key namespace and object keys of the vLLM connector (shared by both sides).

Each chunk is stored as one object per layer, ``chunk_key || layer (uint16 BE)``:
the client reads whole objects, so per-layer objects are what lets a load hand
layer ``l`` to the engine before layer ``l + 1`` has arrived. Blocks are moved
in the kernels' ``"raw"`` format (vLLM's CPU blocks are opaque), so the raw
layout fingerprint and the block size are part of the namespace's model string.
"""

from __future__ import annotations

import struct
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


def layer_key(chunk_key: bytes, layer: int) -> bytes:
    """Object key of one layer of one chunk."""
    return chunk_key + struct.pack(">H", layer)


def keys_for(ns: Namespace, tokens: Sequence[int]) -> list[bytes]:
    """Chunk keys of the full chunks of ``tokens``."""
    return chunk_keys(ns, list(tokens))
