"""KV layouts: what one chunk of KV cache holds and how its bytes are arranged.

A chunk is the KV of ``chunk_tokens`` consecutive tokens of one model shard, all
layers, stored **layer-major** so one layer is one contiguous byte range::

    kind="kv":  [layer][k|v][token][kv_head][head_dim]
    kind="mla": [layer][token][head_dim]          (one latent vector per token)

Moving layer ``l`` alone is then a range transfer of :meth:`KVLayout.layer_range`.
The fingerprint goes into the chunk-key namespace, so caches of different shapes
or dtypes can never be confused for one another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

from kvstore.errors import InvalidArgument

# Item sizes of the dtypes engines keep KV in. bf16/fp16 are 2 raw bytes here:
# the store moves bytes and never interprets them.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

KVKind = Literal["kv", "mla"]


@dataclass(frozen=True)
class KVLayout:
    """Shape of one model shard's KV cache as the store sees it (immutable)."""

    num_layers: int
    """Attention layers in this shard."""
    num_kv_heads: int
    """KV heads in this shard (after tensor parallel split); 1 for MLA."""
    head_dim: int
    """Elements per head (for MLA: the latent width, e.g. 576)."""
    dtype: str = "float16"
    """Element type name, one of :data:`DTYPE_SIZES`."""
    chunk_tokens: int = 256
    """Tokens per chunk."""
    kind: KVKind = "kv"
    """``"kv"``: separate K and V; ``"mla"``: one latent per token."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "chunk_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InvalidArgument(f"KVLayout.{name} must be a positive int, got {v!r}")
        if self.dtype not in DTYPE_SIZES:
            raise InvalidArgument(
                f"KVLayout.dtype {self.dtype!r} unknown; expected one of {sorted(DTYPE_SIZES)}"
            )
        if self.kind not in ("kv", "mla"):
            raise InvalidArgument(f"KVLayout.kind must be 'kv' or 'mla', got {self.kind!r}")
        if self.kind == "mla" and self.num_kv_heads != 1:
            raise InvalidArgument("KVLayout: MLA stores one latent per token; num_kv_heads must be 1")

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def kv_factor(self) -> int:
        """2 for separate K and V, 1 for MLA."""
        return 2 if self.kind == "kv" else 1

    @property
    def token_bytes_per_layer(self) -> int:
        """Bytes of K (and V) for one token in one layer."""
        return self.kv_factor * self.num_kv_heads * self.head_dim * self.itemsize

    def layer_bytes(self, num_tokens: int | None = None) -> int:
        """Bytes of one layer of a chunk holding ``num_tokens`` (default: a full chunk)."""
        return self.token_bytes_per_layer * self._tokens(num_tokens)

    def chunk_bytes(self, num_tokens: int | None = None) -> int:
        """Bytes of a chunk holding ``num_tokens`` (default: a full chunk)."""
        return self.num_layers * self.layer_bytes(num_tokens)

    def layer_range(self, layer: int, num_tokens: int | None = None) -> tuple[int, int]:
        """``(offset, length)`` of ``layer`` inside a chunk's bytes."""
        if not 0 <= layer < self.num_layers:
            raise InvalidArgument(f"layer {layer} out of range [0, {self.num_layers})")
        n = self.layer_bytes(num_tokens)
        return layer * n, n

    def kv_range(self, layer: int, which: Literal["k", "v"], num_tokens: int | None = None) -> tuple[int, int]:
        """``(offset, length)`` of the K or V half of ``layer`` (``kind="kv"`` only)."""
        if self.kind != "kv":
            raise InvalidArgument("kv_range: an MLA layout has no separate K and V")
        off, n = self.layer_range(layer, num_tokens)
        half = n // 2
        return (off, half) if which == "k" else (off + half, half)

    def fingerprint(self) -> str:
        """Stable 16-hex-digit identity of this layout (part of the key namespace)."""
        canon = (
            f"kvlayout-v1|layers={self.num_layers}|heads={self.num_kv_heads}|dim={self.head_dim}"
            f"|dtype={self.dtype}|chunk={self.chunk_tokens}|kind={self.kind}"
        )
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def _tokens(self, num_tokens: int | None) -> int:
        if num_tokens is None:
            return self.chunk_tokens
        if not 0 < num_tokens <= self.chunk_tokens:
            raise InvalidArgument(f"num_tokens {num_tokens} out of range (0, {self.chunk_tokens}]")
        return num_tokens
