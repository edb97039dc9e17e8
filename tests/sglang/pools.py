"""SGLang's own host pools and storage config on CPU, and the backend loaded the way SGLang loads it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from kvstore.kernels.arrays import host_bytes

PAGE, LAYERS, HEADS, DIM, TOKENS = 16, 4, 2, 32, 1024
EXTRA = {"backend_name": "kvstore", "module_path": "connectors.sglang", "class_name": "KVStoreHiCacheStorage",
         "interface_v1": 1}


def mha_host(layout: str = "page_first", dtype: torch.dtype = torch.bfloat16, layers: int = LAYERS,
             heads: int = HEADS, dim: int = DIM, page: int = PAGE, tokens: int = TOKENS) -> Any:
    dev = MHATokenToKVPool(tokens, page, dtype, heads, dim, layers, "cpu", False, start_layer=0, end_layer=layers)
    return MHATokenToKVPoolHost(dev.get_device_pool_infos()[0].buffer_info, 2.0, 0, page, layout, pin_memory=False,
                                device="cpu", device_capacity_tokens=dev.size, start_layer=0, end_layer=layers)


def mla_host(layout: str = "page_first") -> Any:
    dev = MLATokenToKVPool(TOKENS, PAGE, torch.bfloat16, kv_lora_rank=64, qk_rope_head_dim=16, layer_num=LAYERS,
                           device="cpu", enable_memory_saver=False, start_layer=0, end_layer=LAYERS)
    return MLATokenToKVPoolHost(dev.get_device_pool_infos()[0].buffer_info, 2.0, 0, PAGE, layout, pin_memory=False,
                                device="cpu", device_capacity_tokens=dev.size, start_layer=0, end_layer=LAYERS,
                                target_layer_num=LAYERS, override_kv_cache_dim=dev.kv_cache_dim)


def mamba_host(slots: int = 16, layers: int = 2) -> Any:
    """SGLang's Mamba state host pool (one page = one request's state: temporal + conv)."""
    from sglang.srt.mem_cache.device_pool_info import MambaStateBufferInfo
    from sglang.srt.mem_cache.pool_host.mamba import MambaPoolHost

    info = MambaStateBufferInfo(temporal=torch.zeros(layers, slots, 4, 8, dtype=torch.float32),
                                conv=(torch.zeros(layers, slots, 3, 8, dtype=torch.bfloat16),))
    host = MambaPoolHost(info, 2.0, 0, device_capacity=slots, pin_memory=False, device="cpu", layout="page_first")
    g = torch.Generator().manual_seed(slots)
    for buf in (host.temporal_buffer, *host.conv_buffer):
        buf.copy_(torch.randn(buf.shape, generator=g).to(buf.dtype))
    return host


def storage_config(extra: dict[str, Any], *, model: str = "tiny-llama", tp_rank: int = 0, tp_size: int = 1,
                   mla: bool = False, layout: str = "page_first") -> HiCacheStorageConfig:
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=True,
                                is_page_first_layout=layout == "page_first", model_name=model,
                                extra_config=dict(extra))


def backend(master: str, host: Any, *, interface_v1: bool = True, **kw: Any) -> Any:
    """The backend as SGLang's controller makes it: the factory's ``dynamic`` path, then
    ``register_mem_pool_host``."""
    extra = {**EXTRA, "master": master, "timeout": 3.0}
    if not interface_v1:
        extra.pop("interface_v1")
    be = StorageBackendFactory.create_backend("dynamic", storage_config(extra, layout=host.layout, **kw), host)
    be.register_mem_pool_host(host)
    return be


def fill(host: Any, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    buf = host.kv_buffer
    buf.copy_(torch.randn(buf.shape, generator=g).to(buf.dtype))


def page_bytes(host: Any, indices: torch.Tensor, i: int) -> bytes:
    """The bytes of page ``i`` of ``indices`` as the zero-copy API lays them out."""
    ps = host.page_size
    ptrs, sizes = host.get_page_buffer_meta(indices[i * ps:(i + 1) * ps])
    return b"".join(host_bytes(int(p), int(n)).tobytes() for p, n in zip(ptrs, sizes, strict=True))


def pages(host: Any, n: int) -> torch.Tensor:
    idx = host.alloc(n * host.page_size)
    assert idx is not None, "host pool full"
    return idx


def keys(n: int, tag: str) -> list[str]:
    """Page hashes the way SGLang makes them (64 hex digits)."""
    import hashlib

    return [hashlib.sha256(f"{tag}/{i}".encode()).hexdigest() for i in range(n)]


__all__ = ["backend", "fill", "keys", "mha_host", "mla_host", "page_bytes", "pages", "storage_config", "np"]
