"""Scattered destinations: one logical byte buffer made of pieces of host memory.

A reader that wants a value's bytes in several places (the K and V slabs of the
paged blocks of an engine's KV cache, say) passes a :class:`Scattered` where a
contiguous buffer would go (``Client.get_into_batch``). Same-host reads then copy
and verify straight into the pieces in one pass (``kvstore.checksum``); paths that
receive bytes from a socket land them in a temporary buffer first and scatter it
after verification, so every path fills the pieces only with verified bytes.

The pieces are raw addresses: the caller keeps the memory alive (``owner`` is
held for that) and must not hand out the same bytes twice.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from kvstore.errors import InvalidArgument

if TYPE_CHECKING:
    from kvstore.devmem import DeviceBuffer


class Scattered:
    """``len(self)`` bytes laid over ``(address, length)`` pieces, in order.

    Slicing (``s[a:b]``, step 1) gives the pieces covering that logical range.
    """

    readonly = False

    def __init__(self, addrs: Any, lens: Any, *, owner: object = None) -> None:
        a = np.ascontiguousarray(addrs, dtype=np.uint64)
        n = np.ascontiguousarray(lens, dtype=np.uint64)
        if a.ndim != 1 or a.shape != n.shape:
            raise InvalidArgument(f"Scattered: {a.shape} addresses but {n.shape} lengths")
        if len(a) and (not a.all() or not n.all()):
            raise InvalidArgument("Scattered: every piece needs a non-null address and a length > 0")
        starts = np.zeros(len(n) + 1, dtype=np.int64)
        np.cumsum(n, out=starts[1:])
        self._set(a, n, starts, owner)

    def _set(self, addrs: np.ndarray, lens: np.ndarray, starts: np.ndarray, owner: object) -> None:
        self.addrs, self.lens, self.starts, self.owner = addrs, lens, starts, owner
        self._len = int(starts[-1])

    @classmethod
    def _of(cls, addrs: np.ndarray, lens: np.ndarray, owner: object) -> Scattered:
        """From arrays already checked (uint64, non-zero, same shape)."""
        out = cls.__new__(cls)
        starts = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=starts[1:])
        out._set(addrs, lens, starts, owner)
        return out

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"Scattered({len(self)} bytes in {len(self.lens)} pieces)"

    def __getitem__(self, sl: slice) -> Scattered:
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise InvalidArgument("Scattered supports plain slices only")
        lo, hi, _ = sl.indices(self._len)
        if lo == 0 and hi == self._len:
            return self
        if hi <= lo:
            return Scattered._of(np.empty(0, np.uint64), np.empty(0, np.uint64), self.owner)
        first = int(np.searchsorted(self.starts, lo, side="right")) - 1
        last = int(np.searchsorted(self.starts, hi, side="left"))  # pieces first..last-1
        addrs = self.addrs[first:last].copy()
        lens = self.lens[first:last].copy()
        cut = lo - int(self.starts[first])
        addrs[0] += np.uint64(cut)
        lens[0] -= np.uint64(cut)
        lens[-1] -= np.uint64(int(self.starts[last]) - hi)
        return Scattered._of(addrs, lens, self.owner)

    def write(self, at: int, src: Any) -> None:
        """Copy the bytes of ``src`` to logical offset ``at``."""
        mv = memoryview(src).cast("B")
        if at < 0 or at + len(mv) > len(self):
            raise InvalidArgument(f"Scattered.write: [{at}, {at + len(mv)}) outside {len(self)} bytes")
        if not len(mv):
            return
        part = self[at:at + len(mv)]
        base = np.frombuffer(mv, dtype=np.uint8)
        pos = 0
        for addr, n in zip(part.addrs.tolist(), part.lens.tolist(), strict=True):
            ctypes.memmove(addr, base[pos:].ctypes.data, n)
            pos += n

    def views(self) -> list[memoryview]:
        """The pieces as byte views over their memory (no copy; valid while ``owner`` lives)."""
        out = []
        for addr, n in zip(self.addrs.tolist(), self.lens.tolist(), strict=True):
            out.append(memoryview((ctypes.c_uint8 * n).from_address(addr)).cast("B"))
        return out

    def read(self) -> bytes:
        """The bytes the pieces hold now (tests, debugging)."""
        return b"".join(ctypes.string_at(a, n) for a, n in zip(self.addrs.tolist(), self.lens.tolist(), strict=True))


Dest: TypeAlias = "memoryview | Scattered | DeviceBuffer"
"""Where a read lands: a contiguous writable view, a :class:`Scattered`, or CUDA memory
(:class:`~kvstore.client.device.DeviceBuffer`)."""

Source: TypeAlias = "memoryview | Scattered | DeviceBuffer"
"""What a put stores: a contiguous view, a :class:`Scattered` (its pieces in order,
sent or copied piece by piece: no gather into one buffer), or CUDA memory."""


def pieces(value: memoryview | Scattered) -> list[memoryview]:
    """The bytes of a put's value, in order: a :class:`Scattered` value's pieces, or the view."""
    return value.views() if isinstance(value, Scattered) else [value]


def host(value: Source) -> memoryview | Scattered:
    """``value``, which the caller knows is in host memory (CUDA values take their own path)."""
    if not isinstance(value, (memoryview, Scattered)):
        raise AssertionError(f"host memory expected, got {value!r}")
    return value
