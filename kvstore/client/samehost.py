"""One-sided reads out of a same-host node's arena: no round trip, one verified copy.

The node keeps its DRAM arena and an extent-generation table (one uint64 per
allocation granule) in shared segments; a client on the same host maps both
once per node (:meth:`transport.base.Transport.map_remote`). To read a chunk
whose ``(offset, size, checksum, generation)`` it learned from an ALLOCATE or
ACQUIRE reply, it copies straight out of the mapping on the caller's thread,
hashing block by block as it copies (:func:`kvstore.checksum.copy_hashed`), and
accepts the bytes only if

* the node process is still there (its control socket has not hung up),
* the extent generation is unchanged after the copy: the node bumps it when the
  chunk leaves the extent (removed, evicted, demoted, replaced) and when the
  extent is allocated again, so bytes that changed under the copy are noticed
  (x86-64 keeps loads in order, and the node bumps before it lets anyone reuse
  the memory), and
* the key-seeded checksum of what landed matches.

Anything else is not a hit: the caller falls back to the leased path (ACQUIRE),
which never serves bytes either without verifying them. See
docs/design/hot-path.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvstore.checksum import CopyJob, combine, copy_verified_many, nblocks, verified_in_place
from kvstore.client.device import Copier, DeviceBuffer
from kvstore.client.locations import Known
from kvstore.node.protocol import SlotStatus
from kvstore.scatter import Dest
from transport.base import Peer
from transport.shm.memory import populate

_REGION = 2 << 20
"""Page tables of the mapped arena are populated in aligned regions of this many bytes."""


class MappedNode:
    """A same-host node's arena and generation table, mapped. Thread-safe (read-only use)."""

    def __init__(self, peer: Peer, arena: memoryview, generations: memoryview, granule: int) -> None:
        self.peer = peer
        self.arena = arena
        self.generations = np.frombuffer(generations, dtype=np.uint64)
        self.granule = granule
        # A fresh mapping faults on the first touch of every page (~1,000 traps per 4 MiB
        # here, as slow as the copy itself): the first access to each region of the arena
        # maps that region's page tables in one syscall instead (pages stay mapped for the
        # mapping's life, so a region is populated once).
        self._populated = np.zeros(-(-len(arena) // _REGION), dtype=bool)
        self._registered = False  # page-locked for DMA (the first read into CUDA memory)

    def touch(self, offset: int, size: int, *, write: bool = False) -> None:
        """Map the page tables of ``[offset, offset + size)`` before copying there (once per region)."""
        lo, hi = offset // _REGION, -(-(offset + size) // _REGION)
        if hi > lo and not self._populated[lo:hi].all():
            populate(self.arena[lo * _REGION : min(hi * _REGION, len(self.arena))], write=write)
            self._populated[lo:hi] = True

    def read(self, key: bytes, loc: Known, dst: Dest, ranges: list[tuple[int, int]] | None = None,
             *, held: bool = False) -> int:
        """Copy the chunk (or its ``ranges``, back to back) into ``dst``; a :class:`SlotStatus`:
        OK (verified), EXPIRED (the location is stale: fall back) or CORRUPT (bytes
        failed verification). ``held``: a read hold keeps the bytes in place, so the
        generation is not checked."""
        return self.read_many([(key, loc, dst, ranges)], held=held)[0]

    def read_many(self, reads: Sequence[tuple[bytes, Known, Dest, list[tuple[int, int]] | None]],
                  *, held: bool = False, copier: Copier | None = None) -> list[int]:
        """:meth:`read` of every ``(key, location, destination, ranges)``, the copies of all of
        them in one native pass (:func:`~kvstore.checksum.copy_verified_many`: both copy
        threads for a batch of small ranges too); a status per read.

        A CUDA destination (:class:`~kvstore.client.device.DeviceBuffer`, with ``copier``)
        is verified in the arena first and then DMA'd there straight from the arena,
        which ``copier`` page-locks once (docs/gpu.md)."""
        status = [int(SlotStatus.EXPIRED)] * len(reads)
        jobs: list[CopyJob] = []
        todo: list[int] = []
        dma: list[tuple[int, bool]] = []  # CUDA destinations: (read, verified in the arena)
        for i, (key, loc, dst, ranges) in enumerate(reads):
            offset, size = loc.offset, loc.size
            slot = offset // self.granule
            if offset % self.granule or slot >= len(self.generations) or offset + size > len(self.arena):
                continue
            if not held and self.generations[slot] != loc.generation:
                continue
            sums = loc.sums
            if ranges is not None and (sums is None or len(sums) != nblocks(size)
                                       or combine(sums, key) != loc.checksum):
                continue
            self.touch(offset, size)
            if isinstance(dst, DeviceBuffer):
                if copier is None:
                    raise AssertionError("a CUDA destination needs a copier")
                dma.append((i, self._to_device(copier, key, loc, dst, ranges)))
                continue
            jobs.append(CopyJob(key, self.arena[offset : offset + size], dst, loc.checksum, sums, ranges))
            todo.append(i)
        verified = copy_verified_many(jobs)
        if dma:
            assert copier is not None
            copier.wait()  # landed before the generation is read again
            todo += [i for i, _ in dma]
            verified += [ok for _, ok in dma]
        alive = held or self.peer.alive()
        for i, ok in zip(todo, verified, strict=True):
            loc = reads[i][1]
            if not held and (not alive or self.generations[loc.offset // self.granule] != loc.generation):
                continue  # the bytes may have changed under the copy
            status[i] = int(SlotStatus.OK if ok else SlotStatus.CORRUPT)
        return status

    def register(self, copier: Copier) -> None:
        """Page-lock the arena mapping for DMA (the first time CUDA memory is involved)."""
        if not self._registered:
            copier.register(self.arena)
            self._registered = True

    def _to_device(self, copier: Copier, key: bytes, loc: Known, dst: DeviceBuffer,
                   ranges: list[tuple[int, int]] | None) -> bool:
        """Verify the value (or every block ``ranges`` touch) where it lies in the arena, and
        queue its DMA into ``dst`` only if it verified; whether it did."""
        value = self.arena[loc.offset : loc.offset + loc.size]
        if not verified_in_place(key, value, loc.checksum, loc.sums, ranges):
            return False
        self.register(copier)
        at = 0
        for off, n in ranges if ranges is not None else [(0, loc.size)]:
            copier.to_device(dst[at : at + n], value[off : off + n])
            at += n
        return True
