"""Layer-pipelined loads (kvstore.kernels.pipeline): one copy and one scatter launch per
layer on a side stream, an event per layer that the compute stream waits on."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore import kernels
from kvstore.errors import InvalidArgument
from kvstore.kernels.pipeline import LayerLoad


def test_a_host_cache_is_refused_with_a_clear_error() -> None:
    torch = pytest.importorskip("torch")
    layers = [torch.zeros(4, 2, 16, 2, 8) for _ in range(2)]
    cache = kernels.paged_cache(layers, "flash_nhd_block_first")
    with pytest.raises(InvalidArgument, match="CUDA"):
        LayerLoad(cache, [0, 1], [np.zeros(1, np.uint8)] * 2)


@pytest.mark.gpu
def test_gpu_layer_load_lands_every_layer_like_a_whole_scatter() -> None:
    import torch

    spec = "flash_nhd"
    shape = (2, 16, 16, 4, 64)
    torch.manual_seed(0)
    want = [torch.zeros(shape, dtype=torch.float16, device="cuda") for _ in range(6)]
    got = [torch.zeros(shape, dtype=torch.float16, device="cuda") for _ in range(6)]
    cw, cg = kernels.paged_cache(want, spec), kernels.paged_cache(got, spec)
    ids = [3, 9, 1, 12]
    n = kernels.chunk_nbytes(cw, len(ids))
    chunk = torch.randint(0, 255, (n,), dtype=torch.uint8).pin_memory()
    kernels.scatter(cw, ids, chunk.cuda())
    per = n // 6
    load = LayerLoad(cg, ids, [chunk[i * per : (i + 1) * per] for i in range(6)])
    for layer in range(6):
        load.wait(layer)
        assert torch.equal(got[layer], want[layer])  # ordered after the layer's event on this stream
    load.synchronize()
    assert load.done()
    with pytest.raises(InvalidArgument):
        LayerLoad(cg, ids, [chunk[:per]] * 5)
