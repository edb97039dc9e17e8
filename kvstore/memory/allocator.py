"""First-fit extent allocator over ``[0, capacity)`` with coalescing frees.

Used for the DRAM arena and for slots in the disk tier's data file. It hands
out offsets only; who owns the bytes is the caller's business. Not
thread-safe: callers hold their own lock.
"""

from __future__ import annotations

import bisect

from kvstore.errors import InvalidArgument


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) & ~(alignment - 1)


class ExtentAllocator:
    """Free list of ``(offset, size)`` extents sorted by offset."""

    def __init__(self, capacity: int, alignment: int) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise InvalidArgument(f"alignment must be a power of two, got {alignment}")
        self.capacity = capacity - capacity % alignment
        self.alignment = alignment
        self._starts: list[int] = [0] if self.capacity else []
        self._sizes: list[int] = [self.capacity] if self.capacity else []
        self.used = 0

    def rounded(self, nbytes: int) -> int:
        """Bytes an allocation of ``nbytes`` really takes."""
        return align_up(max(nbytes, 1), self.alignment)

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free extent of ``rounded(nbytes)`` bytes, or ``None`` if none fits."""
        if nbytes < 0:
            raise InvalidArgument(f"cannot allocate a negative size ({nbytes} bytes)")
        need = self.rounded(nbytes)
        for i, size in enumerate(self._sizes):
            if size >= need:
                off = self._starts[i]
                if size == need:
                    del self._starts[i]
                    del self._sizes[i]
                else:
                    self._starts[i] = off + need
                    self._sizes[i] = size - need
                self.used += need
                return off
        return None

    def reserve(self, offset: int, nbytes: int) -> bool:
        """Mark ``[offset, offset+rounded(nbytes))`` used; False if any part is not free."""
        need = self.rounded(nbytes)
        if offset % self.alignment or offset < 0 or offset + need > self.capacity:
            return False
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            return False
        start, size = self._starts[i], self._sizes[i]
        if offset + need > start + size:
            return False
        del self._starts[i]
        del self._sizes[i]
        if offset + need < start + size:
            self._starts.insert(i, offset + need)
            self._sizes.insert(i, start + size - offset - need)
        if offset > start:
            self._starts.insert(i, start)
            self._sizes.insert(i, offset - start)
        self.used += need
        return True

    def free(self, offset: int, nbytes: int) -> None:
        """Return an extent; coalesces with free neighbours. Overlap with free space raises."""
        size = self.rounded(nbytes)
        i = bisect.bisect_left(self._starts, offset)
        if (i < len(self._starts) and self._starts[i] < offset + size) or (
            i > 0 and self._starts[i - 1] + self._sizes[i - 1] > offset
        ):
            raise InvalidArgument(f"double free of extent at {offset} ({size} bytes)")
        self.used -= size
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == offset:
            i -= 1
            self._sizes[i] += size
        else:
            self._starts.insert(i, offset)
            self._sizes.insert(i, size)
        if i + 1 < len(self._starts) and self._starts[i] + self._sizes[i] == self._starts[i + 1]:
            self._sizes[i] += self._sizes.pop(i + 1)
            del self._starts[i + 1]

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    @property
    def largest_free(self) -> int:
        return max(self._sizes, default=0)

    def fragments(self) -> int:
        return len(self._starts)
