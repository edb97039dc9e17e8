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


def test_prepare_layers_is_for_gpu_caches() -> None:
    cache = kernels.paged_cache([np.zeros((4, 2, 16, 2, 8), np.float32)] * 2, "flash_nhd_block_first")
    with pytest.raises(InvalidArgument, match="GPU"):
        kernels.prepare_layers(cache, [0, 1], scatter=False)


@pytest.mark.gpu
@pytest.mark.parametrize("ids", [[5, 0, 7, 2], [4, 4, 1]])  # repeated ids: the last copy wins, as in scatter()
def test_gpu_prepared_layer_copies_match_the_per_call_api(ids: list[int]) -> None:
    import torch

    torch.manual_seed(1)
    a = [torch.randn(2, 8, 16, 4, 64, device="cuda", dtype=torch.float16) for _ in range(3)]
    b = [t.clone() for t in a]
    ca, cb = kernels.paged_cache(a, "flash_nhd"), kernels.paged_cache(b, "flash_nhd")
    gather = kernels.prepare_layers(ca, ids, scatter=False)
    scatter = kernels.prepare_layers(cb, ids, scatter=True)
    for layer in range(3):
        want = torch.empty(gather.layer_bytes, dtype=torch.uint8, device="cuda")
        kernels.gather(ca, ids, want, layer=layer, whole_chunk=False)
        got = torch.zeros_like(want)
        gather(layer, got)
        assert torch.equal(got, want)
        chunk = torch.randint(0, 255, (scatter.layer_bytes,), dtype=torch.uint8, device="cuda")
        kernels.scatter(ca, ids, chunk, layer=layer, whole_chunk=False)
        scatter(layer, chunk)
        assert torch.equal(a[layer], b[layer])
    with pytest.raises(InvalidArgument):
        gather(3, got)
    with pytest.raises(InvalidArgument):
        gather(0, torch.empty(8, dtype=torch.uint8, device="cuda"))
