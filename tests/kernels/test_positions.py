"""gather/scatter with explicit chunk positions: block id i goes to (or comes from) chunk
slot positions[i], slots no id names are left alone (one launch for several requests'
blocks laid out in one staging buffer)."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore import kernels
from kvstore.errors import InvalidArgument

SPEC = "layer block head token kv*dim"  # vllm_cpu, a leading layer axis


def _cache(seed: int) -> tuple[np.ndarray, kernels.PagedCache]:
    arr = np.random.default_rng(seed).standard_normal((3, 10, 2, 4, 16)).astype(np.float32)
    return arr, kernels.paged_cache(arr, SPEC)


@pytest.mark.parametrize("fmt", ["raw", "canonical"])
def test_positions_place_each_block_in_its_slot(fmt: str) -> None:
    arr, cache = _cache(0)
    one = kernels.chunk_nbytes(cache, 1, fmt=fmt) // 3  # one block of one layer
    ids, slots = [7, 2, 5], [4, 0, 2]
    out = np.full(5 * one, 0xEE, np.uint8)
    n = kernels.gather(cache, ids, out, layer=1, whole_chunk=False, fmt=fmt, positions=slots)
    assert n == 3 * one
    want = np.full(5 * one, 0xEE, np.uint8)
    if fmt == "raw":
        for b, slot in zip(ids, slots, strict=True):
            kernels.gather(cache, [b], want[slot * one:(slot + 1) * one], layer=1, whole_chunk=False, fmt=fmt)
        assert np.array_equal(out, want)  # slots 1 and 3 untouched
    dst_arr, dst = _cache(1)
    before = dst_arr.copy()
    kernels.scatter(dst, [9, 3, 0], out, layer=1, whole_chunk=False, fmt=fmt, positions=slots)
    for b, src_b in zip([9, 3, 0], ids, strict=True):
        assert np.array_equal(dst_arr[1, b], arr[1, src_b])
    others = [b for b in range(10) if b not in (9, 3, 0)]
    assert np.array_equal(dst_arr[1, others], before[1, others]) and np.array_equal(dst_arr[[0, 2]], before[[0, 2]])


def test_positions_are_checked() -> None:
    _, cache = _cache(2)
    out = np.zeros(1 << 20, np.uint8)
    for kw, match in (({"positions": [0, 0]}, "distinct"), ({"positions": [0]}, "one per block id"),
                      ({"positions": [0, -1]}, ">= 0"), ({"positions": [0, 1], "num_tokens": 5}, "num_tokens"),
                      ({"positions": [0, 1], "backend": "numpy"}, "native")):
        with pytest.raises(InvalidArgument, match=match):
            kernels.gather(cache, [1, 2], out, layer=0, whole_chunk=False, fmt="raw", **kw)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="distinct"):
        kernels.scatter(cache, [1, 1], out, layer=0, whole_chunk=False, fmt="raw", positions=[0, 1])
    with pytest.raises(InvalidArgument, match="buffer holds"):
        kernels.gather(cache, [1, 2], out[:100], layer=0, whole_chunk=False, fmt="raw", positions=[0, 9])
