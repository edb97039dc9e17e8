"""Chunk checksums: XXH3-64 seeded by the chunk's key.

Seeding by the key binds bytes to the key they were stored under, so a chunk
read back under a different key (a reused disk slot, a misrouted transfer) fails
verification even if its bytes are intact. XXH3 runs at several times memcpy
speed, so checking on every read costs little.
"""

from __future__ import annotations

import xxhash

from kvstore._types import Buffer
from kvstore.errors import Corruption

# Verify large copies block by block so each block is hashed while still in cache.
VERIFY_BLOCK = 256 * 1024


def key_seed(key: bytes) -> int:
    """64-bit seed derived from a key (stable across processes and hosts)."""
    return xxhash.xxh3_64_intdigest(key)


def checksum(data: Buffer, key: bytes = b"") -> int:
    """XXH3-64 of ``data`` seeded by ``key``. Never raises for valid buffers."""
    return xxhash.xxh3_64_intdigest(data, seed=key_seed(key))


def hasher(key: bytes = b"") -> xxhash.xxh3_64:
    """An incremental XXH3-64 seeded by ``key``: ``update`` block by block, then
    ``intdigest()`` equals :func:`checksum` of the concatenated blocks."""
    return xxhash.xxh3_64(seed=key_seed(key))


def verify(data: Buffer, expected: int, key: bytes = b"", what: str = "chunk") -> None:
    """Raise :class:`Corruption` when ``data`` does not hash to ``expected``."""
    got = checksum(data, key)
    if got != expected:
        raise Corruption(f"{what}: checksum mismatch (stored {expected:#018x}, read {got:#018x})")


def copy_hashed(src: memoryview, dst: memoryview, key: bytes = b"") -> int:
    """Copy ``src`` into ``dst`` (same length) and return the checksum of what landed.

    Hashing block by block right after copying it reads each block from cache,
    so copy+hash runs close to a bare memcpy.
    """
    n = len(src)
    if len(dst) != n:
        raise ValueError(f"copy_hashed: destination holds {len(dst)} bytes, source {n}")
    if n <= VERIFY_BLOCK:
        dst[:] = src
        return checksum(dst, key)
    h = hasher(key)
    for off in range(0, n, VERIFY_BLOCK):
        end = min(off + VERIFY_BLOCK, n)
        dst[off:end] = src[off:end]
        h.update(dst[off:end])
    return int(h.intdigest())


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
