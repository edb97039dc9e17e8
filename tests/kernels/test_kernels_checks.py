"""Bounds checks happen before memory is touched; layouts derive from strides."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore import kernels
from kvstore.errors import InvalidArgument
from kvstore.kernels import cpu

L, N, H, B, D = 2, 8, 2, 4, 8
needs_native = pytest.mark.skipif(cpu.native() is None, reason=f"native build missing: {cpu.native_error()}")


def vllm_cache() -> tuple[kernels.PagedCache, list[np.ndarray]]:
    rng = np.random.default_rng(1)
    buf = rng.integers(0, 2**16, size=(L, N, H, B, 2 * D), dtype=np.uint16)
    layers = [buf[i] for i in range(L)]  # views of one buffer, like vLLM CPU
    return kernels.paged_cache(layers, "vllm_cpu", dtype="bfloat16"), layers


def test_vllm_cpu_canonical_bytes_match_kvlayout_order() -> None:
    cache, layers = vllm_cache()
    ids = [5, 2, 2, 7]
    out = np.empty(kernels.chunk_nbytes(cache, len(ids)), np.uint8)
    kernels.gather(cache, ids, out)
    chunk = out.view(np.uint16).reshape(L, 2, len(ids) * B, H, D)  # [layer][k|v][token][head][dim]
    for layer in range(L):
        blocks = layers[layer][ids]  # [n, head, token, 2*dim]
        k = blocks[..., :D].transpose(0, 2, 1, 3).reshape(-1, H, D)
        v = blocks[..., D:].transpose(0, 2, 1, 3).reshape(-1, H, D)
        assert np.array_equal(chunk[layer, 0], k) and np.array_equal(chunk[layer, 1], v)
    kvl = cache.kv_layout(len(ids) * B)
    assert kvl.dtype == "bfloat16" and kvl.chunk_bytes() == out.nbytes


def test_raw_is_block_bytes_in_list_order() -> None:
    cache, layers = vllm_cache()
    ids = [3, 0, 6]
    out = np.empty(kernels.chunk_nbytes(cache, len(ids), fmt="raw"), np.uint8)
    kernels.gather(cache, ids, out, fmt="raw")
    want = np.concatenate([layers[layer][ids].reshape(-1).view(np.uint8) for layer in range(L)])
    assert np.array_equal(out, want)


@pytest.mark.parametrize(("axes", "shape"), [("vllm_cpu", (N, H, B, 2 * D)), ("flash_nhd", (2, N, B, H, D))])
def test_raw_pieces_hold_the_raw_bytes_of_a_layer(axes: str, shape: tuple[int, ...]) -> None:
    """Landing a stored raw layer in raw_pieces equals scattering it from staging."""
    tensors = [np.random.default_rng(i).integers(0, 2**16, size=shape, dtype=np.uint16) for i in range(L)]
    cache = kernels.paged_cache(tensors, axes, dtype="bfloat16")
    ids = [6, 1, 4]
    out = np.empty(kernels.chunk_nbytes(cache, len(ids), fmt="raw"), np.uint8)
    kernels.gather(cache, ids, out, fmt="raw")
    per_layer = out.size // L
    for layer in range(L):
        pieces = kernels.raw_pieces(cache, ids, layer)
        assert len(pieces) == per_layer
        assert pieces.read() == out[layer * per_layer:(layer + 1) * per_layer].tobytes()
    both = kernels.raw_pieces(cache, ids, [1, 0])  # one range per layer, in the order given
    assert both.read() == out[per_layer:].tobytes() + out[:per_layer].tobytes()
    with pytest.raises(InvalidArgument):
        kernels.raw_pieces(cache, [N], 0)
    with pytest.raises(InvalidArgument):
        kernels.raw_pieces(cache, ids, L)


@pytest.mark.parametrize(
    ("axes", "shape", "expect"),
    [
        ("flash_nhd", (2, N, B, H, D), {"kv_stride": N * B * H * D * 2, "token_stride": H * D * 2}),
        ("flash_nhd_block_first", (N, 2, B, H, D), {"block_stride": 2 * B * H * D * 2}),
        ("flash_hnd", (2, N, H, B, D), {"head_stride": B * D * 2, "token_stride": D * 2}),
        ("vllm_cpu", (N, H, B, 2 * D), {"kv_stride": D * 2, "token_stride": 2 * D * 2}),
        ("mla", (N, B, 72), {"kv_factor": 1, "head_dim": 72, "token_stride": 144}),
    ],
)
def test_presets_read_strides(axes: str, shape: tuple[int, ...], expect: dict[str, int]) -> None:
    lay = kernels.paged_cache(np.zeros(shape, np.float16), axes).layout
    for k, v in expect.items():
        assert getattr(lay, k) == v, k


def test_strides_come_from_the_tensor_not_the_shape() -> None:
    # Same logical shape, blocks stored innermost-but-one: strides differ, bytes agree.
    dense = np.random.default_rng(2).random((2, N, B, H, D)).astype(np.float32)
    odd = np.ascontiguousarray(dense.transpose(2, 3, 0, 1, 4)).transpose(2, 3, 0, 1, 4)
    a, b = kernels.paged_cache(dense, "flash_nhd"), kernels.paged_cache(odd, "flash_nhd")
    assert a.layout != b.layout
    ids = [1, 7, 0]
    oa, ob = (np.empty(kernels.chunk_nbytes(c, 3), np.uint8) for c in (a, b))
    kernels.gather(a, ids, oa)
    kernels.gather(b, ids, ob)
    assert np.array_equal(oa, ob)
    with pytest.raises(InvalidArgument, match="raw"):
        kernels.gather(b, ids, ob, fmt="raw")  # blocks of `odd` are not dense


@pytest.mark.parametrize(
    ("tensor", "axes", "match"),
    [
        (np.zeros((N, B, H, D), np.float16)[..., ::2], "block token head dim", "contiguous"),
        (np.broadcast_to(np.zeros((1, B, D), np.float16), (N, B, D)), "mla", "overlapping"),
        (np.zeros((3, N, B, H, D), np.float16), "flash_nhd", "size 2"),
        (np.zeros((N, B, D), np.float16), "block token", "'dim'"),
        (np.zeros((N, B, H, D), np.float16), "block token head dim", "MLA"),
        (np.zeros((N, B, D), np.float16), "nonsense", "preset"),
        (np.zeros((N, B, D), np.uint16), "mla", "dtype="),
    ],
)
def test_bad_layouts_raise(tensor: np.ndarray, axes: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        kernels.paged_cache(tensor, axes)


@pytest.mark.parametrize("backend", ["auto", "numpy"])
@pytest.mark.parametrize(
    ("ids", "kwargs", "size_delta", "match"),
    [
        ([0, N], {}, 0, "block id 8 at index 1"),
        ([-1], {}, 0, "block id -1"),
        ([], {}, 0, "non-empty"),
        ([[1, 2]], {}, 0, "1-D"),
        ([1.5], {}, 0, "integer"),
        ([1, 2], {}, -1, "holds"),
        ([1, 2], {"layer": 1}, -1, "holds"),
        ([1, 2], {"layer": 2}, 0, "layer 2"),
        ([1, 2], {"num_tokens": B}, 0, "num_tokens"),
        ([1, 2], {"num_tokens": B + 1, "fmt": "raw"}, 0, "whole blocks"),
        ([1, 2], {"threads": 0}, 0, "threads"),
        ([1, 2], {"fmt": "zip"}, 0, "format"),
    ],
)
def test_bad_arguments_raise_before_touching_memory(
    backend: str, ids: list[object], kwargs: dict[str, object], size_delta: int, match: str
) -> None:
    cache, layers = vllm_cache()
    before = [t.copy() for t in layers]
    size = kernels.chunk_nbytes(cache, 2) + size_delta
    out = np.full(size, 0x5A, np.uint8)
    with pytest.raises(InvalidArgument, match=match):
        kernels.gather(cache, ids, out, backend=backend, **kwargs)  # type: ignore[arg-type]
    assert (out == 0x5A).all()
    with pytest.raises(InvalidArgument, match=match):
        kernels.scatter(cache, ids, out, backend=backend, **kwargs)  # type: ignore[arg-type]
    for t, b in zip(layers, before, strict=True):
        assert np.array_equal(t, b)


def test_read_only_out_raises() -> None:
    cache, _ = vllm_cache()
    out = bytes(kernels.chunk_nbytes(cache, 1))
    with pytest.raises(InvalidArgument, match="read-only"):
        kernels.gather(cache, [0], out)
    kernels.scatter(cache, [0], out)  # reading from read-only bytes is fine


@needs_native
def test_native_checks_ids_and_sizes_itself() -> None:
    """The C++ boundary re-checks what Python checked (defence in depth)."""
    cache, layers = vllm_cache()
    plan = cache.plan("canonical", 2, 2 * B)
    out = np.full(cache.num_layers * plan.layer_dst, 7, np.uint8)
    mod = cpu.native()
    assert mod is not None
    common = {"scatter": False, "chunk_addr": out.ctypes.data, "bases": cache.bases_array, "pos": None, "threads": 2}
    with pytest.raises(InvalidArgument, match="block id 8"):
        cpu.run_plan(mod, plan, chunk_size=out.nbytes, ids=np.array([0, N], np.int64), **common)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="chunk buffer holds"):
        cpu.run_plan(mod, plan, chunk_size=out.nbytes - 1, ids=np.array([0, 1], np.int64), **common)  # type: ignore[arg-type]
    assert (out == 7).all()


def test_scatter_repeated_id_keeps_last_copy() -> None:
    cache, layers = vllm_cache()
    n = kernels.chunk_nbytes(cache, 3)
    chunk = np.arange(n, dtype=np.uint64).astype(np.uint8)
    kernels.scatter(cache, [4, 1, 4], chunk)
    again = np.empty(kernels.chunk_nbytes(cache, 1), np.uint8)
    third = np.empty_like(again)
    kernels.gather(cache, [4], again)
    ref = np.empty(n, np.uint8)
    kernels.gather(cache, [4, 1, 4], ref)
    third[:] = ref.reshape(L, 2, 3, -1)[:, :, 2].reshape(-1)
    assert np.array_equal(again, third)
