"""Property tests: native kernels == NumPy reference, round trips, repeats."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernel_cases import Case, build, cases, id_lists

from kvstore import kernels
from kvstore.errors import InvalidArgument

pytestmark = pytest.mark.skipif(
    kernels.cpu.native() is None, reason=f"native build missing: {kernels.cpu.native_error()}"
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def case_ids(draw: st.DrawFn) -> tuple[Case, list[int], str, int | None, int]:
    case = draw(cases())
    ids = draw(id_lists(case.num_blocks))
    fmt = draw(st.sampled_from(["canonical", "raw"]))
    tokens = None
    if fmt == "canonical" and draw(st.booleans()):
        bs = case.block_size
        tokens = draw(st.integers((len(ids) - 1) * bs + 1, len(ids) * bs))
    return case, ids, fmt, tokens, draw(st.integers(1, 3))


def _raw_ok(cache: kernels.PagedCache, fmt: str) -> bool:
    return fmt == "canonical" or cache.layout.raw_geometry() is not None


@SETTINGS
@given(case_ids())
def test_gather_native_equals_reference(arg: tuple[Case, list[int], str, int | None, int]) -> None:
    case, ids, fmt, tokens, threads = arg
    cache, _ = build(case)
    if not _raw_ok(cache, fmt):
        with pytest.raises(InvalidArgument):
            kernels.chunk_nbytes(cache, len(ids), fmt="raw")
        return
    n = kernels.chunk_nbytes(cache, len(ids), fmt=fmt, num_tokens=tokens)  # type: ignore[arg-type]
    if fmt == "canonical":
        assert n == cache.kv_layout(len(ids) * case.block_size).chunk_bytes(tokens)
    got = np.full(n + 7, 0xAB, np.uint8)
    want = np.full(n + 7, 0xAB, np.uint8)
    kernels.gather(cache, ids, got, fmt=fmt, num_tokens=tokens, threads=threads, backend="native")
    kernels.gather(cache, ids, want, fmt=fmt, num_tokens=tokens, backend="numpy")
    assert np.array_equal(got, want)
    assert (got[n:] == 0xAB).all()  # nothing past the chunk


@SETTINGS
@given(case_ids(), st.integers(0, 2**32 - 1))
def test_scatter_native_equals_reference(
    arg: tuple[Case, list[int], str, int | None, int], seed: int
) -> None:
    case, ids, fmt, tokens, threads = arg
    cache_a, tensors_a = build(case)
    cache_b, tensors_b = build(case)  # same seed: identical bytes
    if not _raw_ok(cache_a, fmt):
        return
    n = kernels.chunk_nbytes(cache_a, len(ids), fmt=fmt, num_tokens=tokens)  # type: ignore[arg-type]
    chunk = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    kernels.scatter(cache_a, ids, chunk, fmt=fmt, num_tokens=tokens, threads=threads, backend="native")
    kernels.scatter(cache_b, ids, chunk, fmt=fmt, num_tokens=tokens, backend="numpy")
    for a, b in zip(tensors_a, tensors_b, strict=True):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


@SETTINGS
@given(case_ids())
def test_round_trip_restores_blocks(arg: tuple[Case, list[int], str, int | None, int]) -> None:
    case, ids, fmt, _, threads = arg
    cache, tensors = build(case)
    if not _raw_ok(cache, fmt):
        return
    before = [t.copy() for t in tensors]
    n = kernels.chunk_nbytes(cache, len(ids), fmt=fmt)  # type: ignore[arg-type]
    chunk = np.empty(n, np.uint8)
    kernels.gather(cache, ids, chunk, fmt=fmt, threads=threads)
    for t in tensors:  # wipe everything, then restore only the gathered blocks
        t[...] = 0
    kernels.scatter(cache, ids, chunk, fmt=fmt, threads=threads)
    again = np.empty(n, np.uint8)
    kernels.gather(cache, ids, again, fmt=fmt)
    assert np.array_equal(chunk, again)
    # Blocks never listed stay wiped; listed ones hold their original bytes.
    mask = np.zeros(case.num_blocks, bool)
    mask[ids] = True
    axes = case.axes_list()
    baxis = axes.index("block")
    for t, b in zip(tensors, before, strict=True):
        t, b = t.view(np.uint8), b.view(np.uint8)  # bytes: random floats include NaNs
        assert np.array_equal(np.compress(mask, t, axis=baxis), np.compress(mask, b, axis=baxis))
        assert not np.compress(~mask, t, axis=baxis).any()


@SETTINGS
@given(case_ids())
def test_layer_at_a_time_equals_all_layers(arg: tuple[Case, list[int], str, int | None, int]) -> None:
    case, ids, fmt, tokens, threads = arg
    cache, _ = build(case)
    if not _raw_ok(cache, fmt):
        return
    n = kernels.chunk_nbytes(cache, len(ids), fmt=fmt, num_tokens=tokens)  # type: ignore[arg-type]
    whole = np.empty(n, np.uint8)
    kernels.gather(cache, ids, whole, fmt=fmt, num_tokens=tokens, threads=threads)
    per = np.zeros(n, np.uint8)
    layer_len = n // cache.num_layers
    for layer in range(cache.num_layers):
        kernels.gather(cache, ids, per, layer=layer, fmt=fmt, num_tokens=tokens)
        alone = np.zeros(layer_len, np.uint8)
        kernels.gather(cache, ids, alone, layer=layer, whole_chunk=False, fmt=fmt, num_tokens=tokens)
        assert np.array_equal(alone, whole[layer * layer_len : (layer + 1) * layer_len])
    assert np.array_equal(per, whole)
    if fmt == "canonical" and tokens is None:
        kvl = cache.kv_layout(len(ids) * case.block_size)
        off, length = kvl.layer_range(cache.num_layers - 1)
        assert (off, length) == ((cache.num_layers - 1) * layer_len, layer_len)
