"""Scattered destinations: slicing, writes, and fused copy + block sums into pieces."""

import numpy as np
import pytest

from kvstore import checksum
from kvstore.checksum import BLOCK, block_sums, copy_range_verified, copy_summed
from kvstore.errors import InvalidArgument
from kvstore.scatter import Scattered


def pieces(sizes: list[int]) -> tuple[list[np.ndarray], Scattered]:
    """Separate arrays (gaps between them) laid out as one Scattered buffer."""
    arrs = [np.zeros(n + 64, dtype=np.uint8)[32:32 + n] for n in sizes]
    return arrs, Scattered([a.ctypes.data for a in arrs], sizes, owner=arrs)


def test_slices_and_writes_cover_the_right_pieces():
    arrs, s = pieces([10, 5, 20])
    assert len(s) == 35 and len(s[3:3]) == 0
    sub = s[8:17]  # last 2 of piece 0, all of piece 1, first 2 of piece 2
    assert sub.lens.tolist() == [2, 5, 2] and len(sub) == 9
    s.write(8, bytes(range(1, 10)))
    assert arrs[0][8:].tolist() == [1, 2] and arrs[1].tolist() == [3, 4, 5, 6, 7] and arrs[2][:2].tolist() == [8, 9]
    assert s.read()[8:17] == bytes(range(1, 10))
    with pytest.raises(InvalidArgument):
        s.write(30, b"x" * 6)
    with pytest.raises(InvalidArgument):
        Scattered([1, 2], [3])
    with pytest.raises(InvalidArgument):
        Scattered([0], [3])


@pytest.mark.parametrize("sizes", [[BLOCK * 2 + 5], [4096] * 130, [32 << 10] * 20 + [17, BLOCK, 3]],
                         ids=["one", "small", "mixed"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_copy_summed_into_pieces_matches_contiguous(sizes, native, monkeypatch):
    if not native:
        monkeypatch.setattr(checksum, "_NATIVE", None)
    n = sum(sizes)
    src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    arrs, s = pieces(sizes)
    sums = copy_summed(memoryview(src), s, b"key")
    assert np.array_equal(sums, block_sums(src, b"key"))
    assert np.array_equal(np.concatenate(arrs), src)


def test_ranged_copy_into_pieces_verifies_edges_and_whole_blocks():
    n = 3 * BLOCK + 1000
    src = np.random.default_rng(1).integers(0, 256, n, dtype=np.uint8)
    sums = block_sums(src, b"k")
    for off, ln in [(7, 3 * BLOCK), (BLOCK, BLOCK), (5, 10), (BLOCK - 3, 6), (0, n), (100, n - 100)]:
        arrs, s = pieces([ln // 3, ln - 2 * (ln // 3), ln // 3] if ln >= 3 else [ln])
        assert copy_range_verified(b"k", sums, memoryview(src), off, s)
        assert s.read() == src[off:off + ln].tobytes()
    bad = src.copy()
    bad[BLOCK + 9] ^= 1
    _, s = pieces([BLOCK, BLOCK])
    assert not copy_range_verified(b"k", sums, memoryview(bad), BLOCK - 50, s)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_many_jobs_in_one_pass_match_one_by_one(native, monkeypatch):
    """copy_verified_many (one native pass over every job, both threads) lands and verifies
    exactly what job-by-job copies do: whole values, ranges with edge blocks, scattered and
    contiguous destinations, an empty value, and a flipped byte failing only its own job."""
    if not native:
        monkeypatch.setattr(checksum, "_NATIVE", None)
    monkeypatch.setattr(checksum, "_THREADS", 2)
    rng = np.random.default_rng(7)
    vals = [rng.integers(0, 256, n, dtype=np.uint8) for n in (5 << 20, 3 * BLOCK + 17, 1000, 0, 2 * BLOCK)]
    keys = [b"v%d" % i for i in range(len(vals))]
    sums = [block_sums(v, k) for v, k in zip(vals, keys, strict=True)]
    bad = vals[4].copy()
    bad[BLOCK + 1] ^= 1
    ranges = [(100, 2 * BLOCK), (3 * BLOCK, 17)]  # an edge start, a whole block, a tail
    _, scattered = pieces([BLOCK // 3, BLOCK, BLOCK - BLOCK // 3 + 17])
    outs = [np.zeros(len(v), dtype=np.uint8) for v in vals]
    ranged_out = np.zeros(2 * BLOCK, dtype=np.uint8)
    jobs = [checksum.CopyJob(k, memoryview(v), memoryview(o), checksum.combine(s, k))
            for k, v, o, s in zip(keys, vals, outs, sums, strict=True)]
    jobs[4] = jobs[4]._replace(value=memoryview(bad))
    jobs.append(checksum.CopyJob(keys[1], memoryview(vals[1]), scattered, checksum.combine(sums[1], keys[1]),
                                 sums[1], ranges))
    jobs.append(checksum.CopyJob(keys[4], memoryview(bad), memoryview(ranged_out), 0, sums[4], [(0, BLOCK)]))
    jobs.append(checksum.CopyJob(keys[4], memoryview(bad), memoryview(ranged_out), 0, sums[4],
                                 [(BLOCK, BLOCK)]))
    assert checksum.copy_verified_many(jobs) == [True, True, True, True, False, True, True, False]
    for v, o in zip(vals[:4], outs[:4], strict=True):
        assert np.array_equal(v, o)
    assert scattered.read() == vals[1][100:100 + 2 * BLOCK].tobytes() + vals[1][3 * BLOCK:].tobytes()
