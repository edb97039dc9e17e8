"""DRAM tier: chunks in a page-aligned host :class:`~kvstore.memory.Arena`.

Reads can be zero-copy: :meth:`DramTier.lease` hands out the allocation with a
reference held, so eviction or removal never frees bytes under a reader.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kvstore._types import Buffer
from kvstore.checksum import combine, copy_summed, copy_verified, verify
from kvstore.errors import Corruption, NoSpace, NotFound
from kvstore.memory import Allocation, Arena
from kvstore.tiers.base import Entry, Tier, TierCapabilities

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    alloc: Allocation
    checksum: int
    sums: np.ndarray
    """Block sums (kvstore.checksum), so partial readers can verify what they read."""


@dataclass(frozen=True)
class Lease:
    """A held reference to a stored chunk; call :meth:`release` exactly once."""

    alloc: Allocation
    checksum: int
    generation: int = 0
    """The extent generation while the lease was taken (see :meth:`Arena.generation`)."""
    sums: np.ndarray | None = None
    """The chunk's block sums (see :mod:`kvstore.checksum`)."""

    @property
    def view(self) -> memoryview:
        return self.alloc.view()

    def release(self) -> None:
        self.alloc.release()


class DramTier(Tier):
    capabilities = TierCapabilities(persistent=False, zero_copy=True, medium="dram")

    def __init__(self, arena: Arena, name: str = "dram") -> None:
        self.name = name
        self.arena = arena
        self._slots: dict[bytes, _Slot] = {}
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    @property
    def used(self) -> int:
        return self.arena.used

    def charge(self, nbytes: int) -> int:
        return self.arena.rounded(nbytes)

    def fits(self, nbytes: int) -> bool:
        return self.arena._alloc.largest_free >= self.arena.rounded(nbytes)

    def put(self, key: bytes, data: Buffer, checksum: int | None = None) -> int:
        src = memoryview(data).cast("B")
        alloc = self.arena.try_alloc(len(src))
        if alloc is None:
            raise NoSpace(f"{self.name}: no room for {len(src)} bytes")
        try:
            sums = copy_summed(src, alloc.view(), key)
            got = combine(sums, key)
            if checksum is not None and got != checksum:
                raise Corruption(f"{self.name}: checksum mismatch (stored {checksum:#018x}, read {got:#018x})")
        except BaseException:
            alloc.release()
            raise
        checksum = got
        with self._lock:
            old = self._slots.get(key)
            self._slots[key] = _Slot(alloc, checksum, sums)
        if old is not None:
            self._retire(old)
        return checksum

    def put_allocation(self, key: bytes, alloc: Allocation, checksum: int, sums: np.ndarray) -> None:
        """Adopt an allocation the caller filled and verified (``sums``: its block sums).
        Ownership of the caller's reference moves here."""
        with self._lock:
            old = self._slots.get(key)
            self._slots[key] = _Slot(alloc, checksum, sums)
        if old is not None:
            self._retire(old)

    def location(self, key: bytes) -> tuple[int, int, int, int] | None:
        """``(offset, size, checksum, generation)`` of ``key`` in the arena, or ``None``.

        For one-sided readers: valid while :meth:`Arena.generation` at ``offset``
        still returns ``generation``.
        """
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return None
            a = slot.alloc
            return a.offset, a.size, slot.checksum, self.arena.generation(a.offset)

    def lease(self, key: bytes) -> Lease | None:
        """Hold the chunk's bytes for a read outside any lock; ``None`` if absent."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return None
            slot.alloc.retain()
            return Lease(slot.alloc, slot.checksum, self.arena.generation(slot.alloc.offset), slot.sums)

    def read_into(self, key: bytes, dst: memoryview) -> None:
        lease = self.lease(key)
        if lease is None:
            raise NotFound(f"{self.name}: key not stored")
        try:
            copy_verified(lease.view, dst, lease.checksum, key, what=self.name)
        finally:
            lease.release()

    def view(self, key: bytes) -> np.ndarray | None:
        lease = self.lease(key)
        if lease is None:
            return None
        try:
            verify(lease.view, lease.checksum, key, what=self.name)
            return lease.alloc.ndarray_view()
        finally:
            lease.release()

    def drop_if(self, key: bytes, alloc: Allocation) -> bool:
        """Remove ``key`` only if it still maps to ``alloc`` (after a failed verify)."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.alloc is not alloc:
                return False
            del self._slots[key]
        self._retire(slot)
        return True

    def remove(self, key: bytes) -> bool:
        with self._lock:
            slot = self._slots.pop(key, None)
        if slot is None:
            return False
        self._retire(slot)
        return True

    def _retire(self, slot: _Slot) -> None:
        """The slot's bytes stop being the stored value: bump the extent generation
        (one-sided readers notice) and drop the tier's reference."""
        self.arena.retire(slot.alloc)
        slot.alloc.release()

    def entry(self, key: bytes) -> Entry | None:
        slot = self._slots.get(key)
        return None if slot is None else Entry(slot.alloc.size, slot.checksum)

    def keys(self) -> Iterator[bytes]:
        return iter(list(self._slots))

    def __len__(self) -> int:
        return len(self._slots)

    def close(self) -> None:
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
        for s in slots:
            s.alloc.release()
        live = self.arena.live()
        if live:
            log.warning("%s: %d chunk view(s) still held at close; memory stays mapped until "
                        "they are dropped", self.name, len(live))
        self.arena.close(force=True)
