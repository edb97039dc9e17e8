"""Export a transformers KV cache into kvstore as chunks, and import it back.

Chunks use the canonical :class:`~kvstore.layout.KVLayout` byte order
``[layer][k|v][token][kv_head][head_dim]``, one object per chunk keyed by
:func:`kvstore.keys.chunk_keys`, so any process holding the same model (same
namespace) finds them from the prompt's tokens alone. Only full chunks are
stored. Works with ``DynamicCache`` of transformers 4.45+ and 5.x (batch 1), on
the CPU or a GPU: a cache on CUDA is exported from CUDA memory and imported into
it (``device="cuda"``) through the SDK's CUDA paths (docs/gpu.md), so its bytes
never pass through pageable host memory. ``client`` is a :class:`~kvstore.client.Client`
or anything with its ``put_batch``/``get_into_batch``/``longest_prefix`` (an
embedded :class:`~kvstore.LocalStore`, whose HBM tier keeps the chunks on the GPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from kvstore.errors import InvalidArgument
from kvstore.keys import Namespace, chunk_keys
from kvstore.layout import KVLayout

if TYPE_CHECKING:
    import torch

    from kvstore.client import Client

_DTYPES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16"}


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers 5.x
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # transformers 4.x


def model_namespace(model: Any, model_id: str, chunk_tokens: int = 256, cache_salt: str = "") -> Namespace:
    """The namespace of ``model``'s cache: layers, KV heads, head dim and dtype from its config."""
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = _DTYPES.get(str(model.dtype))
    if dtype is None:
        raise InvalidArgument(f"unsupported model dtype {model.dtype}")
    layout = KVLayout(num_layers=cfg.num_hidden_layers, num_kv_heads=heads, head_dim=head_dim,
                      dtype=dtype, chunk_tokens=chunk_tokens)
    return Namespace(model=f"hf:{model_id}", layout=layout, cache_salt=cache_salt)


def export_cache(client: Client, ns: Namespace, tokens: list[int], cache: Any) -> int:
    """Store the full chunks of ``cache`` (the KV of ``tokens``, batch 1); returns chunks stored or present.

    Blocking; chunks already in the pool are not sent again (keys are immutable).
    """
    layers = _layers(cache)
    lay = ns.layout
    if len(layers) != lay.num_layers:
        raise InvalidArgument(f"cache has {len(layers)} layers, namespace {lay.num_layers}")
    torch = _torch()
    keys = chunk_keys(ns, tokens)
    c = lay.chunk_tokens
    items: list[tuple[bytes, Any]] = []
    for i, key in enumerate(keys):
        parts = []
        for k, v in layers:
            for t in (k, v):  # [batch, heads, seq, dim] -> [token][head][dim]
                part = t[0, :, i * c:(i + 1) * c, :].transpose(0, 1).contiguous()
                parts.append(part.view(-1).view(dtype=torch.uint8))
        buf = torch.cat(parts)  # on the cache's device
        if buf.numel() != lay.chunk_bytes():
            raise InvalidArgument(f"chunk {i}: {buf.numel()} bytes, layout says {lay.chunk_bytes()}")
        items.append((key, buf if buf.is_cuda else buf.numpy()))
    if items:
        client.put_batch(items)
    return len(items)


def import_cache(client: Client, ns: Namespace, tokens: list[int], *, max_tokens: int | None = None,
                 device: Any = "cpu") -> tuple[Any, int]:
    """A ``DynamicCache`` holding the longest stored prefix of ``tokens``, and its length.

    ``max_tokens`` caps the prefix (pass ``len(tokens) - 1`` so the model still
    computes the last prompt token). A missing or corrupt chunk ends the prefix.
    ``device``: where the cache is built (``"cuda"``: the chunks land in CUDA memory).
    """
    torch = _torch()
    from transformers import DynamicCache

    lay = ns.layout
    keys = chunk_keys(ns, tokens)
    if max_tokens is not None:
        keys = keys[: max(0, max_tokens) // lay.chunk_tokens]
    n = client.longest_prefix(keys) if keys else 0
    on_gpu = torch.device(device).type == "cuda"
    bufs: list[Any] = [torch.empty(lay.chunk_bytes(), dtype=torch.uint8, device=device) if on_gpu
                       else np.empty(lay.chunk_bytes(), np.uint8) for _ in range(n)]
    got = client.get_into_batch(keys[:n], bufs) if n else []
    good = 0
    for size in got:
        if size != lay.chunk_bytes():
            break
        good += 1
    cache = DynamicCache()
    if good == 0:
        return cache, 0
    dt = getattr(torch, lay.dtype)
    c, h, d = lay.chunk_tokens, lay.num_kv_heads, lay.head_dim
    for layer in range(lay.num_layers):
        ks: list[Any] = []
        vs: list[Any] = []
        for b in bufs[:good]:
            pairs: tuple[tuple[Literal["k", "v"], list[Any]], ...] = (("k", ks), ("v", vs))
            for which, out in pairs:
                off, length = lay.kv_range(layer, which)
                raw = b[off:off + length] if on_gpu else torch.from_numpy(b[off:off + length].copy())
                arr = raw.view(dt).view(c, h, d)
                out.append(arr.transpose(0, 1))
        cache.update(torch.cat(ks, 1)[None], torch.cat(vs, 1)[None], layer)
    return cache, good * c


def _torch() -> Any:
    import torch

    return torch
