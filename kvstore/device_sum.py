"""The HBM tier's checksum ("device sum", DSUM64): the host reference.

Chunks in GPU memory are verified where they lie, by a kernel
(``csrc/cuda/device_sum.cu``), so a read never moves unverified bytes off the
device. XXH3 is a chain over stripes and does not spread over thousands of
threads; this function does, and the host computes the same value (here, with
NumPy) for tests and for values it holds itself:

* the value is read as little-endian 64-bit words ``w_0 .. w_{m-1}`` (the last
  one zero-padded);
* word ``i`` contributes ``mix(w_i ^ (seed + (i + 1) * GOLDEN))``, ``mix`` being
  the SplitMix64 finalizer; contributions are summed modulo 2**64 (any thread
  adds any word, in any order; the position inside each term makes swapped
  words count);
* the result is ``mix(total ^ (n * LENGTH) ^ seed)``, so sizes count too.

The seed is :func:`kvstore.checksum.key_seed` of the key, as for the pool's XXH3
sums: bytes read under another key do not verify. It is an integrity check
against corruption and misplaced bytes, not a defence against a forger.
"""

from __future__ import annotations

import numpy as np

from kvstore._types import Buffer
from kvstore.checksum import key_seed

GOLDEN = 0x9E3779B97F4A7C15
LENGTH = 0xD6E8FEB86659FD93
_M = (1 << 64) - 1
_STEP = 1 << 23  # words per NumPy pass (64 MiB): bounds the temporaries


def mix(x: int) -> int:
    """The SplitMix64 finalizer of one 64-bit value."""
    x &= _M
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M
    return x ^ (x >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def total(data: Buffer, seed: int) -> int:
    """The sum of the words' terms modulo 2**64 (what the kernel leaves in ``*out``)."""
    mv = memoryview(data).cast("B")
    n = len(mv)
    whole = n - n % 8
    words = np.frombuffer(mv[:whole], dtype="<u8") if whole else np.empty(0, np.uint64)
    if n % 8:
        tail = np.zeros(8, np.uint8)
        tail[: n % 8] = np.frombuffer(mv[whole:], np.uint8)
        words = np.concatenate([words, tail.view("<u8")])
    acc = 0
    with np.errstate(over="ignore"):
        for start in range(0, len(words), _STEP):
            w = words[start : start + _STEP]
            idx = np.arange(start + 1, start + 1 + len(w), dtype=np.uint64)
            x = w ^ (np.uint64(seed) + idx * np.uint64(GOLDEN))
            acc = (acc + int(_mix_array(x).sum(dtype=np.uint64))) & _M
    return acc


def finish(acc: int, nbytes: int, seed: int) -> int:
    """The device sum from the kernel's ``total``."""
    return mix(acc ^ ((nbytes * LENGTH) & _M) ^ seed)


def device_sum(data: Buffer, key: bytes = b"") -> int:
    """The key-seeded DSUM64 of ``data`` (what the kernel computes on the GPU)."""
    seed = key_seed(key)
    mv = memoryview(data).cast("B")
    return finish(total(mv, seed), len(mv), seed)
