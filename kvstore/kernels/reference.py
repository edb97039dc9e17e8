"""NumPy reference twins of the native gather/scatter (host memory only).

Written from the logical layout (strided views with axes kv, block, token,
head, bytes), not from :class:`~kvstore.kernels.paged.CopyPlan`, so tests that
compare it with the native kernels check the plan as well as the copy loop.
Single-threaded and slow; the fallback when ``kvstore._native`` is missing.
Blocking; safe to call from several threads on disjoint destinations.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from kvstore.kernels.arrays import host_bytes
from kvstore.kernels.paged import ChunkFormat, PagedLayout


def layer_view(base: int, lay: PagedLayout) -> np.ndarray:
    """Writable uint8 view ``[kv][block][token][head][row byte]`` of one layer."""
    lo, hi = lay.span()
    raw = host_bytes(base + lo, hi - lo)
    return as_strided(
        raw[-lo:],
        shape=(lay.kv_factor, lay.num_blocks, lay.block_size, lay.num_kv_heads, lay.row_bytes),
        strides=(lay.kv_stride, lay.block_stride, lay.token_stride, lay.head_stride, 1),
    )


def _chunk_layer(chunk: np.ndarray, lay: PagedLayout, num_tokens: int) -> np.ndarray:
    """A canonical chunk layer as ``[kv][token][head][row byte]``."""
    return chunk.reshape(lay.kv_factor, num_tokens, lay.num_kv_heads, lay.row_bytes)


def _raw_blocks(view: np.ndarray, lay: PagedLayout, block_id: int) -> list[np.ndarray]:
    """The dense byte slabs of one block, in raw-format order."""
    geo = lay.raw_geometry()
    assert geo is not None, "raw format checked by the caller"
    kv_count, slab = geo
    out = []
    for kv in range(kv_count):
        start = view[kv, block_id, 0, 0, :1]
        addr = start.__array_interface__["data"][0]
        out.append(host_bytes(addr, slab))
    return out


def gather_layer(
    base: int, lay: PagedLayout, ids: np.ndarray, out: np.ndarray, fmt: ChunkFormat, num_tokens: int
) -> None:
    """Gather one layer of blocks ``ids`` into the 1-D uint8 array ``out`` (exact size)."""
    view = layer_view(base, lay)
    if fmt == "raw":
        parts = [s for b in ids for s in _raw_blocks(view, lay, int(b))]
        out[:] = np.concatenate(parts)
        return
    sel = view[:, ids].reshape(lay.kv_factor, -1, lay.num_kv_heads, lay.row_bytes)
    _chunk_layer(out, lay, num_tokens)[:] = sel[:, :num_tokens]


def scatter_layer(
    base: int, lay: PagedLayout, ids: np.ndarray, chunk: np.ndarray, fmt: ChunkFormat, num_tokens: int
) -> None:
    """Scatter one layer from ``chunk`` into blocks ``ids``; a repeated id keeps its last copy."""
    view = layer_view(base, lay)
    if fmt == "raw":
        off = 0
        for b in ids:
            for s in _raw_blocks(view, lay, int(b)):
                s[:] = chunk[off : off + len(s)]
                off += len(s)
        return
    src = _chunk_layer(chunk, lay, num_tokens)
    bs = lay.block_size
    for j, b in enumerate(ids):
        nt = min(bs, num_tokens - j * bs)
        view[:, int(b), :nt] = src[:, j * bs : j * bs + nt]
