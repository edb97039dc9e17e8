"""Engine paged-cache layouts, derived from shape + strides, and copy plans.

An engine keeps each layer's KV in ``num_blocks`` blocks of ``block_size``
tokens. Which axis is which is named by an *axes spec* (a preset name or a
space separated list of ``layer kv block token head dim kv*dim``); every stride
is read from the tensor itself, never assumed from the shape:

==========================  ==================================  =====================
preset                      tensor shape                        engine
==========================  ==================================  =====================
``vllm_cpu``                ``[blocks, heads, block, 2*dim]``   vLLM CPU (one per layer)
``flash_nhd``               ``(2, blocks, block, heads, dim)``  FlashAttention, K/V outer
``flash_nhd_block_first``   ``(blocks, 2, block, heads, dim)``  FlashAttention, blocks outer
``flash_hnd``               ``(2, blocks, heads, block, dim)``  HND variant
``flash_hnd_block_first``   ``(blocks, 2, heads, block, dim)``  HND variant
``mla``                     ``(blocks, block, latent)``         MLA (one latent per token)
==========================  ==================================  =====================

``kv*dim`` is one axis of ``2*dim`` elements holding K then V. A ``layer`` axis
describes one tensor holding every layer. ``head_dim`` must be the contiguous
innermost axis. :meth:`PagedCache.plan` turns a layout into the loop nest that
``csrc/paged_copy.h`` and ``csrc/cuda/paged_copy.cu`` execute.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from kvstore.errors import InvalidArgument
from kvstore.kernels.arrays import ArrayInfo, Device, describe
from kvstore.layout import DTYPE_SIZES, KVLayout

ChunkFormat = Literal["canonical", "raw"]

PRESETS: dict[str, str] = {
    "vllm_cpu": "block head token kv*dim",
    "flash_nhd": "kv block token head dim",
    "flash_nhd_block_first": "block kv token head dim",
    "flash_hnd": "kv block head token dim",
    "flash_hnd_block_first": "block kv head token dim",
    "mla": "block token dim",
}
_AXES = ("layer", "kv", "block", "token", "head", "dim", "kv*dim")
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "bfloat16_raw": "bfloat16"}


@dataclass(frozen=True)
class PagedLayout:
    """One layer's paged cache: sizes and byte strides (immutable)."""

    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    itemsize: int
    kv_factor: int
    """2: separate K and V; 1: MLA."""
    block_stride: int
    token_stride: int
    head_stride: int
    kv_stride: int

    @property
    def row_bytes(self) -> int:
        """Contiguous bytes of one head of one token (``head_dim * itemsize``)."""
        return self.head_dim * self.itemsize

    @property
    def block_bytes(self) -> int:
        """Payload bytes of one block (K and V), as stored in a chunk."""
        return self.kv_factor * self.block_size * self.num_kv_heads * self.row_bytes

    def _dims(self) -> list[tuple[int, int]]:
        """(size, stride) of kv, token, head, block (head_dim is the contiguous row)."""
        return [
            (self.kv_factor, self.kv_stride),
            (self.block_size, self.token_stride),
            (self.num_kv_heads, self.head_stride),
            (self.num_blocks, self.block_stride),
        ]

    def span(self) -> tuple[int, int]:
        """``(lo, hi)`` byte offsets from a layer's base bounding all its elements."""
        lo, hi = 0, self.row_bytes
        for n, s in self._dims():
            lo += (n - 1) * min(s, 0)
            hi += (n - 1) * max(s, 0)
        return lo, hi

    def raw_geometry(self) -> tuple[int, int] | None:
        """``(kv_count, slab_bytes)`` of the raw-block format, or None if unsupported.

        Raw needs each block (``kv_count=1``) or each K/V half of a block
        (``kv_count=2``) to be one dense, forward byte range.
        """
        inner = [(self.block_size, self.token_stride), (self.num_kv_heads, self.head_stride)]
        if _dense(inner + [(self.kv_factor, self.kv_stride)], self.row_bytes):
            return 1, self.block_bytes
        if _dense(inner, self.row_bytes) and self.kv_stride > 0:
            return self.kv_factor, self.block_bytes // self.kv_factor
        return None


def _dense(dims: list[tuple[int, int]], row: int) -> bool:
    """True when ``dims`` (size, stride) tile one forward range after ``row`` bytes."""
    acc = row
    for n, s in sorted((d for d in dims if d[0] > 1), key=lambda d: d[1]):
        if s != acc:
            return False
        acc *= n
    return True


@dataclass(frozen=True)
class CopyPlan:
    """The loop nest of ``csrc/paged_copy.h`` for one (format, block count, tokens)."""

    chunk_blocks: int
    num_blocks: int
    block_stride: int
    block_tokens: int
    num_tokens: int
    kv_count: int
    kv_src: int
    kv_dst: int
    tok_merge: int
    tok_src: int
    tok_dst: int
    head_count: int
    head_src: int
    head_dst: int
    run: int
    blk_dst: int
    layer_dst: int

    @functools.cached_property
    def kwargs(self) -> dict[str, int]:
        """The fields as keyword arguments of ``kvstore._native.paged_copy`` (cached)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True, eq=False)
class PagedCache:
    """A live paged KV cache: layout, one base address per layer, device.

    Holds references to the tensors it was built from (``owners``), so the
    addresses stay valid while this object lives. Immutable and thread-safe;
    the memory itself is the engine's, and concurrent writers are its business.
    """

    layout: PagedLayout
    bases: tuple[int, ...]
    dtype: str
    device: Device
    device_id: int
    owners: tuple[Any, ...] = field(repr=False)
    bases_array: np.ndarray = field(repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return len(self.bases)

    def kv_layout(self, chunk_tokens: int) -> KVLayout:
        """The :class:`KVLayout` whose chunk bytes :func:`gather` produces (canonical)."""
        lay = self.layout
        return KVLayout(
            num_layers=self.num_layers,
            num_kv_heads=lay.num_kv_heads,
            head_dim=lay.head_dim,
            dtype=self.dtype,
            chunk_tokens=chunk_tokens,
            kind="kv" if lay.kv_factor == 2 else "mla",
        )

    def raw_fingerprint(self) -> str:
        """16 hex digits naming the raw-block byte arrangement.

        Raw chunks are only exchangeable between caches with equal fingerprints;
        put it in the key namespace (cache salt) when storing raw chunks.
        """
        lay = self.layout
        geo = lay.raw_geometry()
        if geo is None:
            raise InvalidArgument("this layout has no raw-block format (blocks are not dense)")
        order = sorted(
            (s, n, name)
            for name, (n, s) in zip(("kv", "token", "head"), lay._dims()[:3], strict=True)
            if n > 1
        )
        canon = f"rawblocks-v1|{self.dtype}|dim={lay.head_dim}|kvcount={geo[0]}|order={order}"
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def plan(self, fmt: ChunkFormat, chunk_blocks: int, num_tokens: int) -> CopyPlan:
        """Loop nest for ``chunk_blocks`` blocks holding ``num_tokens`` tokens (memoized)."""
        return _plan(self.layout, fmt, chunk_blocks, num_tokens)


@functools.lru_cache(maxsize=1024)
def _plan(lay: PagedLayout, fmt: ChunkFormat, chunk_blocks: int, num_tokens: int) -> CopyPlan:
    """Loop nest of one layout; memoized because every call of a pipeline repeats it."""
    row, heads, bs = lay.row_bytes, lay.num_kv_heads, lay.block_size
    if fmt == "raw":
        geo = lay.raw_geometry()
        if geo is None:
            raise InvalidArgument(
                "raw chunk format needs dense blocks; this layout has none, use fmt='canonical'"
            )
        kv_count, slab = geo
        return CopyPlan(
            chunk_blocks=chunk_blocks, num_blocks=lay.num_blocks, block_stride=lay.block_stride,
            block_tokens=1, num_tokens=chunk_blocks, kv_count=kv_count,
            kv_src=lay.kv_stride if kv_count > 1 else 0, kv_dst=slab if kv_count > 1 else 0,
            tok_merge=1, tok_src=0, tok_dst=0, head_count=1, head_src=0, head_dst=0,
            run=slab, blk_dst=lay.block_bytes, layer_dst=chunk_blocks * lay.block_bytes,
        )
    if fmt != "canonical":
        raise InvalidArgument(f"chunk format must be 'canonical' or 'raw', got {fmt!r}")
    tok_dst = heads * row
    run, head_count, head_src, head_dst = row, heads, lay.head_stride, row
    tok_merge = 1
    if heads == 1 or lay.head_stride == row:  # heads of a token are one run
        run, head_count, head_src, head_dst = heads * row, 1, 0, 0
        if bs == 1 or lay.token_stride == tok_dst:  # so are the tokens of a block
            tok_merge = bs
    kv_dst = num_tokens * tok_dst
    return CopyPlan(
        chunk_blocks=chunk_blocks, num_blocks=lay.num_blocks, block_stride=lay.block_stride,
        block_tokens=bs, num_tokens=num_tokens, kv_count=lay.kv_factor,
        kv_src=lay.kv_stride, kv_dst=kv_dst if lay.kv_factor > 1 else 0,
        tok_merge=tok_merge, tok_src=lay.token_stride, tok_dst=tok_dst,
        head_count=head_count, head_src=head_src, head_dst=head_dst,
        run=run, blk_dst=bs * tok_dst, layer_dst=lay.kv_factor * kv_dst,
    )


def parse_axes(axes: str) -> list[str]:
    names = PRESETS.get(axes, axes).split()
    bad = [a for a in names if a not in _AXES]
    if bad or len(set(names)) != len(names):
        raise InvalidArgument(
            f"axes {axes!r}: expected a preset {sorted(PRESETS)} or distinct names from {_AXES}"
        )
    for need in ("block", "token"):
        if need not in names:
            raise InvalidArgument(f"axes {axes!r} lack a {need!r} axis")
    if ("dim" in names) == ("kv*dim" in names):
        raise InvalidArgument(f"axes {axes!r} need exactly one of 'dim' and 'kv*dim'")
    if "kv*dim" in names and "kv" in names:
        raise InvalidArgument(f"axes {axes!r}: 'kv*dim' already holds K and V; drop 'kv'")
    if names[-1] not in ("dim", "kv*dim"):
        raise InvalidArgument(f"axes {axes!r}: head_dim must be the last (contiguous) axis")
    return names


def derive_layout(info: ArrayInfo, axes: str) -> tuple[PagedLayout, int, int]:
    """``(layout, num_layers, layer_stride)`` of one tensor read through ``axes``."""
    names = parse_axes(axes)
    if len(names) != len(info.shape):
        raise InvalidArgument(f"axes {axes!r} name {len(names)} axes; tensor has shape {info.shape}")
    size = dict(zip(names, info.shape, strict=True))
    stride = dict(zip(names, info.strides, strict=True))
    isz = info.itemsize
    if "kv*dim" in names:
        if size["kv*dim"] % 2:
            raise InvalidArgument(f"'kv*dim' axis has odd size {size['kv*dim']}; expected 2*head_dim")
        head_dim, dim_stride = size["kv*dim"] // 2, stride["kv*dim"]
        kv_factor, kv_stride = 2, head_dim * dim_stride
    else:
        head_dim, dim_stride = size["dim"], stride["dim"]
        kv_factor, kv_stride = size.get("kv", 1), stride.get("kv", 0)
    if head_dim > 1 and dim_stride != isz:
        raise InvalidArgument(f"head_dim axis must be contiguous: stride {dim_stride} B, item {isz} B")
    if kv_factor not in (1, 2):
        raise InvalidArgument(f"'kv' axis must have size 2 (K, V), got {kv_factor}")
    heads = size.get("head", 1)
    if kv_factor == 1 and heads != 1:
        raise InvalidArgument("no 'kv' axis means MLA (one latent per token), which has one head")
    layout = PagedLayout(
        num_blocks=size["block"], block_size=size["token"], num_kv_heads=heads,
        head_dim=head_dim, itemsize=isz, kv_factor=kv_factor,
        block_stride=stride["block"], token_stride=stride["token"],
        head_stride=stride.get("head", 0), kv_stride=kv_stride if kv_factor > 1 else 0,
    )
    if min(layout.num_blocks, layout.block_size, heads, head_dim) <= 0:
        raise InvalidArgument(f"empty paged cache of shape {info.shape}")
    _check_no_overlap(layout, size.get("layer", 1), stride.get("layer", 0))
    return layout, size.get("layer", 1), stride.get("layer", 0)


def _check_no_overlap(lay: PagedLayout, layers: int, layer_stride: int) -> None:
    """Reject strides under which two elements share bytes (a scatter would race)."""
    dims = [d for d in lay._dims() + [(layers, layer_stride)] if d[0] > 1]
    extent = lay.row_bytes
    for n, s in sorted(dims, key=lambda d: abs(d[1])):
        if abs(s) < extent:
            raise InvalidArgument(f"overlapping strides: stride {s} B is inside a {extent} B extent")
        extent = abs(s) * (n - 1) + extent
    # Sorted-by-stride nesting is sufficient for every engine layout we know;
    # an interleaving it rejects is reported rather than guessed at.


def paged_cache(tensors: Any, axes: str, *, dtype: str | None = None) -> PagedCache:
    """Build a :class:`PagedCache` from one tensor or a sequence of per-layer tensors.

    ``tensors``: a NumPy array, torch tensor or CuPy array (one layer, or all
    layers when ``axes`` has a ``layer`` axis), or a sequence of per-layer ones
    that share shape, strides, dtype and device (vLLM's list of views).
    ``dtype`` names the element type when the array's own is a stand-in
    (``uint16`` holding bfloat16). Raises :class:`InvalidArgument`.
    """
    seq = list(tensors) if isinstance(tensors, Sequence) else [tensors]
    if not seq:
        raise InvalidArgument("paged_cache: no tensors")
    infos = [describe(t) for t in seq]
    first = infos[0]
    for k, inf in enumerate(infos[1:], 1):
        same = (inf.shape, inf.strides, inf.itemsize, inf.device, inf.device_id)
        if same != (first.shape, first.strides, first.itemsize, first.device, first.device_id):
            raise InvalidArgument(f"paged_cache: layer {k} differs from layer 0 in shape/strides/device")
    layout, n_sub, layer_stride = derive_layout(first, axes)
    if n_sub > 1 and len(infos) > 1:
        raise InvalidArgument("paged_cache: give one tensor with a 'layer' axis or a list, not both")
    bases = [inf.address + k * layer_stride for inf in infos for k in range(n_sub)]
    name = _dtype_name(dtype or first.dtype, first.itemsize)
    return PagedCache(
        layout=layout, bases=tuple(bases), dtype=name, device=first.device,
        device_id=first.device_id, owners=tuple(seq),
        bases_array=np.array(bases, dtype=np.uint64),
    )


def _dtype_name(name: str, itemsize: int) -> str:
    name = _DTYPE_ALIASES.get(name, name)
    if name in DTYPE_SIZES and DTYPE_SIZES[name] == itemsize:
        return name
    # Raw stand-ins (uint16 for bf16, int8 for fp8) keep their width but need a name.
    raise InvalidArgument(
        f"element type {name!r} ({itemsize} B) is not a KV dtype; pass dtype= one of "
        f"{sorted(k for k, v in DTYPE_SIZES.items() if v == itemsize)}"
    )
