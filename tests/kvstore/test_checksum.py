"""Block checksums: one value for every way of computing them, and verified ranges."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstore.checksum as C


def _python_only(fn):
    native, C._NATIVE = C._NATIVE, None
    try:
        return fn()
    finally:
        C._NATIVE = native


sizes = st.one_of(st.integers(0, 3 * C.BLOCK + 17), st.sampled_from([C.BLOCK - 1, C.BLOCK, C.BLOCK + 1]))


@settings(max_examples=40, deadline=None)
@given(n=sizes, key=st.binary(min_size=0, max_size=40), seed=st.integers(0, 2**32 - 1))
def test_every_path_computes_the_same_checksum(n, key, seed):
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    want = _python_only(lambda: C.checksum(data, key))
    assert C.checksum(data, key) == want
    dst = np.empty_like(data)
    assert C.copy_hashed(data.data, dst.data, key) == want and np.array_equal(dst, data)
    h = C.hasher(key)
    for off in range(0, n, 100_003):
        h.update(data.data[off:off + 100_003])
    assert h.intdigest() == want
    assert C.combine(C.block_sums(data, key), key) == want
    if n <= C.BLOCK:  # one block: the plain XXH3-64 of the bytes, as before block sums
        import xxhash
        assert want == xxhash.xxh3_64_intdigest(data.tobytes(), seed=C.key_seed(key))


def test_native_backend_is_built():
    if C.backend() != "native":
        pytest.skip("kvstore._native was built without the xxHash library (libxxhash-dev); python path in use")
    big = np.random.default_rng(0).integers(0, 256, 20 << 20, dtype=np.uint8)  # split over threads
    assert C.checksum(big, b"k") == _python_only(lambda: C.checksum(big, b"k"))



# XXH3's length classes (<=16, <=128, <=240, long) and its 1 KiB block / 64-byte stripe edges:
# the native copy fuses its own copy of XXH3's long-input loop, so it must agree at every edge.
EDGES = [0, 1, 16, 17, 128, 129, 240, 241, 255, 256, 1023, 1024, 1025, 1087, 1088, 1089, 2048, 2049,
         4095, C.BLOCK - 64, C.BLOCK - 1, C.BLOCK, C.BLOCK + 1, C.BLOCK + 241]


@pytest.mark.parametrize("n", EDGES)
def test_fused_copy_hash_matches_xxh3_at_length_edges(n):
    import xxhash
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    dst = np.zeros(n + 7, dtype=np.uint8)[3:3 + n]  # unaligned destination
    sums = C.copy_summed(data.data, dst.data, b"edge")
    assert np.array_equal(dst, data)
    seed = C.key_seed(b"edge")
    want = [xxhash.xxh3_64_intdigest(data[o:o + C.BLOCK].tobytes(), seed=seed) for o in range(0, max(n, 1), C.BLOCK)]
    assert [int(s) for s in sums] == want

@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_ranges_verify_and_catch_a_flipped_byte(data):
    n = data.draw(st.integers(1, 3 * C.BLOCK + 5))
    value = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    sums = C.block_sums(value, b"k")
    off = data.draw(st.integers(0, n - 1))
    length = data.draw(st.integers(1, n - off))
    src = memoryview(value.tobytes())

    def read(source: memoryview) -> tuple[bool, bytes]:
        dst = bytearray(length)
        ok = C.read_range_verified(b"k", sums, n, off, memoryview(dst),
                                   lambda p, v: v.__setitem__(slice(None), source[p:p + len(v)]),
                                   lambda p, m: source[p:p + m])
        # the in-memory variant (whole blocks in one native pass) agrees, flipped byte or not
        fast = bytearray(length)
        assert C.copy_range_verified(b"k", sums, source, off, memoryview(fast)) == ok
        assert not ok or fast == dst
        return ok, bytes(dst)

    assert read(src) == (True, value[off:off + length].tobytes())
    # A flipped byte anywhere in a touched block (inside the range or not) fails it.
    blocks = C.covering(off, length)
    flip = data.draw(st.integers(blocks.start * C.BLOCK, min(blocks.stop * C.BLOCK, n) - 1))
    bad = bytearray(src)
    bad[flip] ^= 0x5A
    assert read(memoryview(bytes(bad)))[0] is False


@pytest.mark.parametrize("n", [0, 1, (4 << 20) - 1, 4 << 20, (9 << 20) + 17])
def test_copy_into_copies_exactly_the_source(n: int) -> None:
    """Below 4 MiB a slice assignment, from there the two-thread native copy: same bytes,
    nothing past the source's length touched."""
    from kvstore.checksum import copy_into

    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    dst = np.full(n + 64, 7, dtype=np.uint8)
    copy_into(memoryview(dst).cast("B"), memoryview(src).cast("B"))
    assert np.array_equal(dst[:n], src) and (dst[n:] == 7).all()


def test_gather_summed_writes_pieces_back_to_back_and_hashes_what_landed():
    """A put's same-host copy: values in pieces (crossing block edges, pieces of every
    size) and contiguous ones, all in one batch, land back to back with their block sums."""
    from kvstore.checksum import BLOCK, block_sums, gather_summed
    from kvstore.scatter import Scattered

    rng = np.random.default_rng(1)
    a, b, c, d = (rng.integers(0, 256, n, dtype=np.uint8) for n in (100, 130_000, 2 * BLOCK + 7, 5 << 20))
    values = [[a], [b, a], [c, b, d], [d]]
    flats = [np.concatenate(v) for v in values]
    dsts = [np.zeros(f.nbytes, np.uint8) for f in flats]
    srcs = [Scattered([p.ctypes.data for p in v], [p.nbytes for p in v], owner=v) for v in values[:3]]
    got = gather_summed([(memoryview(dst), src, b"k%d" % i)
                         for i, (dst, src) in enumerate(zip(dsts, [*srcs, memoryview(flats[3])], strict=True))])
    for i, (dst, flat, sums) in enumerate(zip(dsts, flats, got, strict=True)):
        assert np.array_equal(dst, flat)
        assert np.array_equal(sums, block_sums(flat, b"k%d" % i))
    with pytest.raises(ValueError, match="destination holds"):
        gather_summed([(memoryview(dsts[0])[:-1], srcs[0], b"k")])
    assert gather_summed([]) == []  # a batch whose every ALLOCATE was refused


def test_verified_in_place_checks_the_value_or_the_blocks_its_ranges_touch() -> None:
    from kvstore.checksum import BLOCK, block_sums, checksum, verified_in_place

    v = bytearray(np.random.default_rng(11).integers(0, 256, 3 * BLOCK + 99, dtype=np.uint8).tobytes())
    key = b"in-place"
    c, sums = checksum(v, key), block_sums(v, key)
    view = memoryview(v)
    assert verified_in_place(key, view, c, None, None)
    assert verified_in_place(key, view, c, sums, [(BLOCK - 3, 10), (3 * BLOCK, 99)])
    assert not verified_in_place(b"other", view, c, None, None)  # a foreign value
    assert not verified_in_place(key, view, c, sums[:-1], [(0, 10)])  # sums of another size
    v[2 * BLOCK + 5] ^= 1  # the third block rots
    assert not verified_in_place(key, view, c, None, None)
    assert verified_in_place(key, view, c, sums, [(0, BLOCK), (3 * BLOCK, 50)])  # ranges around it still verify
    assert not verified_in_place(key, view, c, sums, [(2 * BLOCK + 100, 1)])
