"""CUDA kernels vs the NumPy reference (needs an NVIDIA GPU and CuPy)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from kvstore import kernels

pytestmark = pytest.mark.gpu


def _cupy() -> Any:
    try:
        import cupy as cp
    except ImportError:
        pytest.skip("CuPy not installed: no CUDA path to test")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cp.cuda.runtime.CUDARuntimeError as e:
        pytest.skip(f"no usable CUDA device: {e}")
    return cp


@pytest.mark.parametrize("axes", ["vllm_cpu", "flash_nhd", "flash_hnd_block_first", "mla"])
@pytest.mark.parametrize("fmt", ["canonical", "raw"])
def test_cuda_matches_reference(axes: str, fmt: str) -> None:
    cp = _cupy()
    shapes = {
        "vllm_cpu": (9, 4, 16, 128), "flash_nhd": (2, 9, 16, 4, 64),
        "flash_hnd_block_first": (9, 2, 4, 16, 64), "mla": (9, 16, 576),
    }
    host = np.random.default_rng(5).integers(0, 2**16, size=(3, *shapes[axes]), dtype=np.uint16)
    dev = cp.asarray(host)
    spec = "layer " + kernels.PRESETS[axes]
    hc = kernels.paged_cache(host, spec, dtype="bfloat16")
    dc = kernels.paged_cache(dev, spec, dtype="bfloat16")
    ids = [7, 2, 2, 8, 0]
    tokens = None if fmt == "raw" else 70
    n = kernels.chunk_nbytes(hc, len(ids), fmt=fmt, num_tokens=tokens)  # type: ignore[arg-type]
    want = np.empty(n, np.uint8)
    kernels.gather(hc, ids, want, fmt=fmt, num_tokens=tokens, backend="numpy")  # type: ignore[arg-type]
    got = cp.zeros(n, cp.uint8)
    kernels.gather(dc, ids, got, fmt=fmt, num_tokens=tokens)  # type: ignore[arg-type]
    assert np.array_equal(cp.asnumpy(got), want)
    to_host = np.zeros(n, np.uint8)  # host chunk: staged through the device
    kernels.gather(dc, ids, to_host, fmt=fmt, num_tokens=tokens)  # type: ignore[arg-type]
    assert np.array_equal(to_host, want)
    chunk = np.random.default_rng(6).integers(0, 256, n, dtype=np.uint8)
    kernels.scatter(hc, ids, chunk, fmt=fmt, num_tokens=tokens, backend="numpy")  # type: ignore[arg-type]
    kernels.scatter(dc, ids, cp.asarray(chunk), fmt=fmt, num_tokens=tokens)  # type: ignore[arg-type]
    cp.cuda.get_current_stream().synchronize()
    assert np.array_equal(cp.asnumpy(dev), host)
