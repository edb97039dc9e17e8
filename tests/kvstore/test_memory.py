import gc
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import InvalidArgument, KVStoreError, NoSpace
from kvstore.memory import Arena, ExtentAllocator


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 20_000)), max_size=200))
@settings(max_examples=200)
def test_allocator_never_overlaps_and_accounts_exactly(ops):
    a = ExtentAllocator(256 * 1024, 512)
    live: dict[int, int] = {}
    for do_alloc, n in ops:
        if do_alloc or not live:
            off = a.alloc(n)
            if off is None:
                assert a.largest_free < a.rounded(n)
                continue
            for o, m in live.items():
                assert off + a.rounded(n) <= o or o + a.rounded(m) <= off
            live[off] = n
        else:
            off = random.choice(list(live))
            a.free(off, live.pop(off))
        assert a.used == sum(a.rounded(m) for m in live.values())
        assert a.used <= a.capacity
    for off, n in live.items():
        a.free(off, n)
    assert a.used == 0 and a.fragments() == 1  # fully coalesced


def test_allocator_double_free_and_reserve():
    a = ExtentAllocator(8192, 4096)
    off = a.alloc(10)
    a.free(off, 10)
    with pytest.raises(InvalidArgument):
        a.free(off, 10)
    assert a.reserve(4096, 4096)
    assert not a.reserve(4096, 1)  # already used
    assert not a.reserve(100, 1)  # misaligned
    assert a.alloc(1) == 0
    assert a.alloc(1) is None


def test_arena_is_page_aligned_and_refcounted():
    with Arena(1 << 20, prefault=False) as arena:
        a = arena.alloc(5000)
        assert a.address() % 4096 == 0 and a.nbytes == 8192
        a.view()[:] = b"x" * 5000
        a.retain()
        a.release()
        assert arena.used == 8192
        a.release()
        assert arena.used == 0
        with pytest.raises(InvalidArgument, match="double free"):
            a.release()
        with pytest.raises(InvalidArgument, match="use after free"):
            a.view()


def test_arena_detects_leaks_at_close():
    arena = Arena(1 << 20, prefault=False)
    a = arena.alloc(100)
    with pytest.raises(KVStoreError, match="leak"):
        arena.close()
    assert arena.live() == [a]
    a.release()
    arena.close()


def test_zero_copy_view_holds_its_bytes_until_collected():
    with Arena(1 << 20, prefault=False) as arena:
        a = arena.alloc(4096)
        a.view()[:4] = b"abcd"
        v = a.ndarray_view()
        a.release()  # owner gone; the view still holds a reference
        assert arena.used == 4096 and bytes(v[:4]) == b"abcd"
        assert not v.flags.writeable
        del v
        gc.collect()
        assert arena.used == 0


@pytest.mark.parametrize("n", [-1, 2**62, 1.5, True])
def test_arena_rejects_bad_sizes(n):
    with Arena(1 << 20, prefault=False) as arena, pytest.raises(InvalidArgument):
        arena.alloc(n)


def test_arena_full_raises_no_space():
    with Arena(64 * 1024, prefault=False) as arena:
        held = [arena.alloc(4096) for _ in range(16)]
        with pytest.raises(NoSpace):
            arena.alloc(1)
        for h in held:
            h.release()


def test_pin_on_without_cuda_is_a_clear_error():
    pytest.importorskip("numpy")
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy present: pinning may succeed here")
    except ImportError:
        pass
    with pytest.raises(InvalidArgument, match="CUDA"):
        Arena(1 << 20, pin="on")
