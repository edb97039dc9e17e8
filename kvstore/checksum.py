"""Chunk checksums: XXH3-64 seeded by the chunk's key, over 256 KiB blocks.

Seeding by the key binds bytes to the key they were stored under, so a chunk
read back under a different key (a reused disk slot, a misrouted transfer) fails
verification even if its bytes are intact.

A value is hashed in :data:`BLOCK`-sized blocks; its checksum is the hash of
the blocks' hashes (for a value of one block, that block's hash: the plain
XXH3-64 of the bytes). The block sums are what make partial reads verifiable:
a reader of one layer of a chunk hashes only the blocks that layer covers and
compares them with the block sums, which it checks against the checksum once
(:func:`combine`). Hashing each block right after copying it reads the block
from cache, so copy+verify runs in one pass over memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import xxhash

from kvstore._types import Buffer
from kvstore.errors import Corruption, InvalidArgument
from kvstore.scatter import Scattered

BLOCK = 256 * 1024
"""Bytes per checksummed block (part of the stored format: changing it changes every checksum)."""
_ROOT_TWEAK = 0x6B7673746F726531  # the root hash never equals a block hash of the same seed


NATIVE_ABI = 2
"""``ABI_VERSION`` of the ``csrc/`` build this Python code calls (2: the batch kernel's
gather direction); an older build is not used (:mod:`kvstore.kernels.cpu` checks it too)."""


def _load_native() -> Any:
    """``kvstore._native`` when it was built with the xxHash library, else ``None``."""
    try:
        from kvstore import _native
    except ImportError:
        return None
    if getattr(_native, "ABI_VERSION", None) != NATIVE_ABI:
        logging.getLogger(__name__).warning(
            "kvstore._native is a stale build (ABI %s, want %s): checksums use the Python xxhash package; "
            "rebuild with `pip install -e .`", getattr(_native, "ABI_VERSION", None), NATIVE_ABI)
        return None
    return _native if hasattr(_native, "block_sums") else None


_NATIVE = _load_native()
_THREADS = 2
"""Threads for one native copy-and-hash pass: a large value, or a batch of many
(:func:`copy_verified_many`); a second thread only from 4 MiB per thread on."""
_MIN_PER_THREAD = 4 << 20


def backend() -> str:
    """``"native"`` (C++ with xxHash's run-time SIMD dispatch) or ``"python"`` (the xxhash package)."""
    return "native" if _NATIVE is not None else "python"


def address_of(mv: memoryview) -> int:
    """Where the bytes of ``mv`` start in this process (0 for an empty view)."""
    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data) if len(mv) else 0


def _native_sums(dst: memoryview | None, src: memoryview, key: bytes) -> np.ndarray:
    sums = np.empty(nblocks(len(src)), dtype=np.uint64)
    _NATIVE.block_sums(address_of(dst) if dst is not None else 0, address_of(src), len(src), key_seed(key),
                       int(sums.ctypes.data), BLOCK, _THREADS)
    return sums


def key_seed(key: bytes) -> int:
    """64-bit seed derived from a key (stable across processes and hosts)."""
    return xxhash.xxh3_64_intdigest(key)


def nblocks(size: int) -> int:
    """Number of checksummed blocks of a value of ``size`` bytes (at least one)."""
    return max(1, -(-size // BLOCK))


def block_sums(data: Buffer, key: bytes = b"") -> np.ndarray:
    """The XXH3-64 of every :data:`BLOCK` of ``data`` (uint64 array), seeded by ``key``."""
    mv = memoryview(data).cast("B")
    if _NATIVE is not None:
        return _native_sums(None, mv, key)
    seed = key_seed(key)
    n = len(mv)
    return np.array([xxhash.xxh3_64_intdigest(mv[off:off + BLOCK], seed=seed)
                     for off in range(0, max(n, 1), BLOCK)], dtype=np.uint64)


def block_sums_of(value: memoryview | Scattered, key: bytes = b"") -> np.ndarray:
    """:func:`block_sums` of a contiguous value or of the bytes of a :class:`Scattered`
    laid end to end (without gathering them: pieces that start on block boundaries are
    hashed in place, natively; others are streamed block by block)."""
    if not isinstance(value, Scattered):
        return block_sums(value, key)
    pieces = value.views()
    starts = value.starts.tolist()
    if all(st % BLOCK == 0 for st in starts[:-1]):  # every piece starts a block: hash each on its own
        return np.concatenate([block_sums(p, key) for p in pieces])
    h = BlockHasher(key)
    for p in pieces:
        h.update(p)
    return h.sums()


def combine(sums: np.ndarray, key: bytes = b"") -> int:
    """The checksum of a value from its block sums."""
    if len(sums) == 1:
        return int(sums[0])
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(sums, dtype="<u8").tobytes(),
                                    seed=key_seed(key) ^ _ROOT_TWEAK)


def checksum(data: Buffer, key: bytes = b"") -> int:
    """The key-seeded checksum of ``data``. Never raises for valid buffers."""
    mv = memoryview(data).cast("B")
    if len(mv) <= BLOCK:
        return xxhash.xxh3_64_intdigest(mv, seed=key_seed(key))
    return combine(block_sums(mv, key), key)


def verify(data: Buffer, expected: int, key: bytes = b"", what: str = "chunk") -> None:
    """Raise :class:`Corruption` when ``data`` does not hash to ``expected``."""
    got = checksum(data, key)
    if got != expected:
        raise Corruption(f"{what}: checksum mismatch (stored {expected:#018x}, read {got:#018x})")


def copy_into(dst: memoryview, src: memoryview) -> None:
    """``dst[:len(src)] = src``, over both copy threads from 4 MiB on (native build)."""
    n = len(src)
    if _NATIVE is None or n < _MIN_PER_THREAD:
        dst[:n] = src
        return
    _NATIVE.copy(address_of(dst), address_of(src), n, _THREADS)


def copy_summed(src: memoryview, dst: memoryview | Scattered, key: bytes = b"") -> np.ndarray:
    """Copy ``src`` into ``dst`` (same length; a :class:`~kvstore.scatter.Scattered`
    destination gets it piece by piece); the block sums of what landed."""
    n = len(src)
    if len(dst) != n:
        raise ValueError(f"copy_hashed: destination holds {len(dst)} bytes, source {n}")
    if isinstance(dst, Scattered):
        return _copy_summed_scattered(src, dst, key)
    if dst.readonly:
        raise ValueError("copy_hashed: destination is read-only")
    if _NATIVE is not None:
        return _native_sums(dst, src, key)
    seed = key_seed(key)
    sums = np.empty(nblocks(n), dtype=np.uint64)
    for i, off in enumerate(range(0, max(n, 1), BLOCK)):
        end = min(off + BLOCK, n)
        dst[off:end] = src[off:end]
        sums[i] = xxhash.xxh3_64_intdigest(dst[off:end], seed=seed)
    return sums


def _copy_summed_scattered(src: memoryview, dst: Scattered, key: bytes) -> np.ndarray:
    sums = np.empty(nblocks(len(src)), dtype=np.uint64)
    if _NATIVE is not None and hasattr(_NATIVE, "block_sums_scatter"):
        if len(src):
            _NATIVE.block_sums_scatter(address_of(src), len(src), int(dst.addrs.ctypes.data),
                                       int(dst.lens.ctypes.data), len(dst.lens), key_seed(key),
                                       int(sums.ctypes.data), BLOCK, _THREADS)
        else:
            sums[0] = xxhash.xxh3_64_intdigest(b"", seed=key_seed(key))
        return sums
    seed = key_seed(key)
    for i, off in enumerate(range(0, max(len(src), 1), BLOCK)):
        end = min(off + BLOCK, len(src))
        dst.write(off, src[off:end])
        sums[i] = xxhash.xxh3_64_intdigest(dst[off:end].read(), seed=seed)
    return sums


def copy_hashed(src: memoryview, dst: memoryview | Scattered, key: bytes = b"") -> int:
    """Copy ``src`` into ``dst`` (same length) and return the checksum of what landed."""
    return combine(copy_summed(src, dst, key), key)


def copy_verified(
    src: memoryview, dst: memoryview, expected: int, key: bytes = b"", what: str = "chunk"
) -> None:
    """Copy ``src`` into ``dst`` and verify what landed against ``expected``.

    Raises :class:`Corruption` on mismatch; ``dst`` then holds unverified bytes
    the caller must not use.
    """
    got = copy_hashed(src, dst, key)
    if got != expected:
        raise Corruption(f"{what}: checksum mismatch (stored {expected:#018x}, read {got:#018x})")


class BlockHasher:
    """Incremental block sums: ``update`` bytes in order, then :meth:`sums`."""

    def __init__(self, key: bytes = b"") -> None:
        self._seed = key_seed(key)
        self._key = key
        self._h = xxhash.xxh3_64(seed=self._seed)
        self._fill = 0
        self._sums: list[int] = []

    def update(self, data: memoryview) -> None:
        pos = 0
        if self._fill == 0 and len(data) >= BLOCK:  # whole blocks at a block boundary: in one native pass
            pos = len(data) // BLOCK * BLOCK
            self._sums.extend(block_sums(data[:pos], self._key).tolist())
        while pos < len(data):
            take = min(BLOCK - self._fill, len(data) - pos)
            self._h.update(data[pos:pos + take])
            self._fill += take
            pos += take
            if self._fill == BLOCK:
                self._sums.append(self._h.intdigest())
                self._h.reset()
                self._fill = 0

    def sums(self) -> np.ndarray:
        tail = [self._h.intdigest()] if self._fill or not self._sums else []
        return np.array(self._sums + tail, dtype=np.uint64)

    def intdigest(self) -> int:
        return combine(self.sums(), self._key)


def hasher(key: bytes = b"") -> BlockHasher:
    """An incremental hasher: ``update`` block by block, then ``intdigest()`` equals
    :func:`checksum` of the concatenated data."""
    return BlockHasher(key)


def covering(offset: int, length: int) -> range:
    """Indices of the blocks that bytes ``[offset, offset + length)`` of a value touch."""
    return range(offset // BLOCK, -(-(offset + length) // BLOCK))


class Segment(NamedTuple):
    """One block a range touches: bytes ``[start, lo)`` and ``[hi, end)`` of the value
    are read only to hash the block; ``[lo, hi)`` lands in the range's destination."""

    block: int
    start: int
    lo: int
    hi: int
    end: int


def segments(size: int, offset: int, length: int) -> list[Segment]:
    """The blocks that bytes ``[offset, offset + length)`` of a ``size``-byte value touch."""
    out = []
    for b in covering(offset, length):
        start, end = b * BLOCK, min((b + 1) * BLOCK, size)
        out.append(Segment(b, start, max(start, offset), min(end, offset + length), end))
    return out


def read_range_verified(key: bytes, sums: np.ndarray, size: int, offset: int, dst: memoryview,
                        land: Callable[[int, memoryview], None],
                        peek: Callable[[int, int], memoryview]) -> bool:
    """Move bytes ``[offset, offset + len(dst))`` of a value into ``dst`` and verify every
    block they touch against ``sums`` (already checked against the value's checksum).

    ``land(pos, view)`` fills ``view`` with the value's bytes from ``pos``;
    ``peek(pos, n)`` returns the ``n`` bytes from ``pos`` that do not land (the rest
    of a block the range only partly covers), to be hashed. Both are called in
    ascending ``pos`` order, covering each touched block exactly once (so a byte
    stream can feed them). Returns ``False`` if any block failed; all blocks are
    consumed even then.
    """
    seed, ok = key_seed(key), True
    for seg in segments(size, offset, len(dst)):
        h = xxhash.xxh3_64(seed=seed)
        if seg.lo > seg.start:
            h.update(peek(seg.start, seg.lo - seg.start))
        view = dst[seg.lo - offset : seg.hi - offset]
        land(seg.lo, view)
        h.update(view)
        if seg.end > seg.hi:
            h.update(peek(seg.hi, seg.end - seg.hi))
        ok = ok and h.intdigest() == int(sums[seg.block])
    return ok


class CopyJob(NamedTuple):
    """One value to move into ``dst`` and verify (see :func:`copy_verified_many`): all of
    ``value`` (its bytes in memory), checked against ``checksum``; or, with ``ranges``,
    those ``(offset, length)`` ranges of it back to back, each block they touch checked
    against ``sums`` (the value's block sums, already checked against ``checksum``)."""

    key: bytes
    value: memoryview
    dst: memoryview | Scattered
    checksum: int
    sums: np.ndarray | None = None
    ranges: Sequence[tuple[int, int]] | None = None


def verified_in_place(key: bytes, value: memoryview, checksum: int, sums: np.ndarray | None,
                      ranges: Sequence[tuple[int, int]] | None) -> bool:
    """Whether ``value`` (in memory, not copied) is the one of ``checksum``; with ``ranges``,
    whether every block they touch matches ``sums`` (the value's block sums, which must
    combine into ``checksum``). For a copy that cannot hash as it goes (a DMA to a GPU)."""
    if ranges is None:
        return combine(block_sums(value, key), key) == checksum
    if sums is None or len(sums) != nblocks(len(value)) or combine(sums, key) != checksum:
        return False
    for off, n in ranges:
        b = covering(off, n)
        if not np.array_equal(block_sums(value[b.start * BLOCK : b.stop * BLOCK], key), sums[b.start : b.stop]):
            return False
    return True


def copy_verified_many(jobs: Sequence[CopyJob]) -> list[bool]:
    """Move every job's bytes into its destination, verifying what landed; per job,
    whether all of it verified (a job that did not holds unverified bytes).

    The blocks every range covers whole, of every job, are copied and hashed in one
    native pass spread over the copy threads (so a batch of many small ranges uses
    them as well as one large value does); the partly covered edge blocks of a range
    go as :func:`read_range_verified` does (through a small bounce buffer when the
    destination is :class:`~kvstore.scatter.Scattered`).
    """
    ok = [True] * len(jobs)
    pairs: list[tuple[memoryview, memoryview | Scattered, bytes]] = []
    checks: list[tuple[int, int | np.ndarray]] = []  # per pair: its job, and its checksum or expected sums
    for j, job in enumerate(jobs):
        if job.ranges is None:
            pairs.append((job.value, job.dst[: len(job.value)], job.key))
            checks.append((j, job.checksum))
            continue
        sums, value = job.sums, job.value
        assert sums is not None, "a ranged CopyJob needs the value's block sums"
        at = 0
        for off, n in job.ranges:
            dst, end = job.dst[at : at + n], off + n
            at += n
            lo = -(-off // BLOCK) * BLOCK  # first whole block
            hi = end // BLOCK * BLOCK if end < len(value) else len(value)  # end of the last whole block
            if hi <= lo:
                ok[j] = _edge_verified(job.key, sums, value, off, dst) and ok[j]
                continue
            if lo > off:
                ok[j] = _edge_verified(job.key, sums, value, off, dst[: lo - off]) and ok[j]
            pairs.append((value[lo:hi], dst[lo - off : hi - off], job.key))
            checks.append((j, sums[lo // BLOCK : lo // BLOCK + nblocks(hi - lo)]))
            if end > hi:
                ok[j] = _edge_verified(job.key, sums, value, hi, dst[hi - off :]) and ok[j]
    got, first = _copy_summed_flat(pairs)
    for p, (j, expect) in enumerate(checks):
        mine = got[first[p] : first[p + 1]]
        same = (combine(mine, jobs[j].key) == expect if isinstance(expect, int)
                else np.array_equal(mine, expect))
        ok[j] = same and ok[j]
    return ok


def _copy_summed_flat(pairs: Sequence[tuple[memoryview, memoryview | Scattered, bytes]]
                      ) -> tuple[np.ndarray, list[int]]:
    """:func:`copy_summed` of every ``(src, dst, key)``: all the block sums back to back, and
    where each pair's start (``first[i]:first[i + 1]``); one native pass over all pairs."""
    first = [0]
    for src, dst, _ in pairs:
        if len(dst) != len(src):
            raise ValueError(f"copy_hashed: destination holds {len(dst)} bytes, source {len(src)}")
        if isinstance(dst, memoryview) and dst.readonly:
            raise ValueError("copy_hashed: destination is read-only")
        first.append(first[-1] + nblocks(len(src)))
    out = np.empty(first[-1], dtype=np.uint64)
    batch = [i for i, (src, _, _) in enumerate(pairs) if len(src)]
    if _NATIVE is None or not hasattr(_NATIVE, "block_sums_batch") or len(batch) < 2:
        for i, (src, dst, key) in enumerate(pairs):
            out[first[i] : first[i + 1]] = copy_summed(src, dst, key)
        return out, first
    for i in set(range(len(pairs))) - set(batch):  # empty values: the sum of nothing
        out[first[i]] = xxhash.xxh3_64_intdigest(b"", seed=key_seed(pairs[i][2]))
    sums = _native_batch([pairs[i][0] for i in batch], [pairs[i][1] for i in batch],
                         [pairs[i][2] for i in batch], gather=False)
    at = 0
    for i in batch:
        n = first[i + 1] - first[i]
        out[first[i] : first[i + 1]] = sums[at : at + n]
        at += n
    return out, first


def gather_summed(jobs: Sequence[tuple[memoryview, memoryview | Scattered, bytes]]) -> list[np.ndarray]:
    """Copy each ``(dst, src, key)``'s source (contiguous, or a
    :class:`~kvstore.scatter.Scattered` value's pieces back to back) into its contiguous
    destination of the same length; per job, the block sums of what landed. One native
    pass spread over the copy threads for the whole batch (a put of many pages in many
    pieces uses both cores), each block hashed right after it landed."""
    for dst, src, _ in jobs:
        if len(dst) != len(src):
            raise ValueError(f"gather_summed: destination holds {len(dst)} bytes, source {len(src)}")
        if dst.readonly:
            raise ValueError("gather_summed: destination is read-only")
    if not jobs:
        return []
    batch = [j for j, (_, src, _) in enumerate(jobs) if len(src)]
    if _NATIVE is None or not hasattr(_NATIVE, "block_sums_batch") or len(batch) < len(jobs):
        out = []
        for dst, src, key in jobs:
            at = 0
            for piece in (src.views() if isinstance(src, Scattered) else [src]):
                copy_into(dst[at:at + len(piece)], piece)
                at += len(piece)
            out.append(block_sums(dst, key))
        return out
    sums = _native_batch([d for d, _, _ in jobs], [s for _, s, _ in jobs], [k for _, _, k in jobs], gather=True)
    first = np.zeros(len(jobs) + 1, dtype=np.int64)
    np.cumsum([nblocks(len(d)) for d, _, _ in jobs], out=first[1:])
    return [sums[first[j]:first[j + 1]] for j in range(len(jobs))]


def _native_batch(flats: Sequence[memoryview], segmented: Sequence[memoryview | Scattered],
                  keys: Sequence[bytes], *, gather: bool) -> np.ndarray:
    """One ``block_sums_batch`` call: each flat buffer copied into its segmented side
    (``gather``: the other way), every job non-empty; all block sums back to back."""
    flat = np.array([address_of(f) for f in flats], dtype=np.uint64)
    lens = np.array([len(f) for f in flats], dtype=np.int64)
    seeds = np.array([key_seed(k) for k in keys], dtype=np.uint64)
    segs = [(s.addrs, s.lens) if isinstance(s, Scattered)
            else (np.array([address_of(s)], dtype=np.uint64), np.array([len(s)], dtype=np.uint64))
            for s in segmented]
    begin = np.zeros(len(flats) + 1, dtype=np.int64)
    np.cumsum([len(a) for a, _ in segs], out=begin[1:])
    seg_addr = np.concatenate([a for a, _ in segs]).astype(np.uint64, copy=False)
    seg_len = np.concatenate([n for _, n in segs]).astype(np.uint64, copy=False)
    sums = np.empty(sum(nblocks(int(n)) for n in lens), dtype=np.uint64)
    _NATIVE.block_sums_batch(int(flat.ctypes.data), int(lens.ctypes.data), int(begin.ctypes.data),
                             int(seg_addr.ctypes.data), int(seg_len.ctypes.data), int(seeds.ctypes.data),
                             len(flats), int(sums.ctypes.data), BLOCK, _THREADS, gather)
    return sums


def copy_range_verified(key: bytes, sums: np.ndarray, value: memoryview, offset: int,
                        dst: memoryview | Scattered) -> bool:
    """:func:`read_range_verified` for a value in memory (``value``: all of its bytes):
    one ranged :class:`CopyJob` (see :func:`copy_verified_many`)."""
    return copy_verified_many([CopyJob(key, value, dst, 0, sums, [(offset, len(dst))])])[0]


def _edge_verified(key: bytes, sums: np.ndarray, value: memoryview, offset: int,
                   dst: memoryview | Scattered) -> bool:
    if not isinstance(dst, Scattered):
        return _read_range_in_memory(key, sums, value, offset, dst)
    bounce = bytearray(len(dst))
    ok = _read_range_in_memory(key, sums, value, offset, memoryview(bounce))
    dst.write(0, bounce)
    return ok


def _read_range_in_memory(key: bytes, sums: np.ndarray, value: memoryview, offset: int, dst: memoryview) -> bool:
    def land(pos: int, view: memoryview) -> None:
        view[:] = value[pos : pos + len(view)]

    return read_range_verified(key, sums, len(value), offset, dst, land, lambda pos, n: value[pos : pos + n])


def check_ranges(ranges: Sequence[Any], what: str = "ranges") -> list[tuple[int, int]]:
    """Validate ``(offset, length)`` pairs (ints, offset >= 0, length > 0); InvalidArgument."""
    out = []
    for r in ranges:
        if (not isinstance(r, (tuple, list)) or len(r) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in r)
                or r[0] < 0 or r[1] <= 0):
            raise InvalidArgument(f"{what}: each range is (offset >= 0, length > 0), got {r!r}")
        out.append((int(r[0]), int(r[1])))
    if not out:
        raise InvalidArgument(f"{what}: at least one range")
    return out
