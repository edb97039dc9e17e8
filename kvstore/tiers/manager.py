"""Tier manager: placement, watermark eviction (LRU), demotion, promotion, pins.

Policy only; bytes move through the tiers' own methods. New chunks land in
DRAM. When DRAM use passes the high watermark, least recently used unpinned
chunks are demoted to disk (or dropped, without a disk tier) until use falls
below the low watermark. A disk hit is promoted back to DRAM; the disk copy is
kept (inclusive caching), so evicting a promoted chunk again costs no write.
Pinned chunks are never evicted from any tier.

Thread-safety: one lock guards all metadata and writes; DRAM reads copy
outside it under a lease, so readers don't serialize on large copies.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from kvstore.checksum import block_sums, combine, copy_verified, verify
from kvstore.errors import Corruption, InvalidArgument, KVStoreError, NoSpace
from kvstore.memory import Allocation
from kvstore.tiers.base import Entry, Tier
from kvstore.tiers.disk import DiskTier
from kvstore.tiers.dram import DramTier, Lease
from kvstore.units import format_size

log = logging.getLogger(__name__)
T = TypeVar("T")


class TierManager:
    def __init__(
        self,
        dram: DramTier,
        disk: DiskTier | None,
        *,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        promote_on_hit: bool = True,
        write_through: bool = False,
    ) -> None:
        self.dram = dram
        self.disk = disk
        self.high = high_watermark
        self.low = low_watermark
        self.promote_on_hit = promote_on_hit
        self.write_through = write_through and disk is not None
        self._lock = threading.RLock()
        self._lru: dict[str, OrderedDict[bytes, None]] = {"dram": OrderedDict(), "disk": OrderedDict()}
        self.pins: set[bytes] = set()
        self.lost: list[bytes] = []
        self.counters: Counter[str] = Counter()
        if disk is not None:
            for key in disk.keys():
                self._lru["disk"][key] = None
            self.counters["corrupt.disk.index"] += disk.corrupt_on_open

    # -- writes --------------------------------------------------------------

    @property
    def max_value(self) -> int:
        return max(self.dram.capacity, self.disk.capacity if self.disk is not None else 0)

    def put(self, key: bytes, data: memoryview, pin: bool = False) -> None:
        # A replaced value stays readable until its successor is in place: each tier
        # swaps atomically, and a copy left in another tier goes only afterwards (with
        # write-through the disk copy is swapped too), so a crash mid-put loses nothing
        # that was acknowledged before.
        n = len(data)
        with self._lock:
            if self._make_room_dram(n):
                checksum = self.dram.put(key, data)
                self._touch("dram", key)
                self.counters["puts.dram"] += 1
                if self.write_through:
                    self._write_through(key, data, checksum)
                elif self.disk is not None and self.disk.remove(key):
                    self._lru["disk"].pop(key, None)  # the old value's disk copy
            elif self.disk is not None and self._make_room_disk(n):
                self.disk.put(key, data)
                self._touch("disk", key)
                self.counters["puts.disk"] += 1
                if self.dram.remove(key):
                    self._lru["dram"].pop(key, None)
            else:
                raise NoSpace(
                    f"no room for {format_size(n)}: DRAM has {format_size(self.dram.capacity - self.dram.used)} "
                    f"free and {len(self.pins)} pinned chunk(s)"
                    + ("" if self.disk is not None else "; configure a disk tier (store.disk_dir) for more room")
                )
            if pin:
                self.pins.add(key)
            self._enforce_watermark()

    def _touch(self, tier: str, key: bytes) -> None:
        lru = self._lru[tier]
        lru[key] = None
        lru.move_to_end(key)

    def _write_through(self, key: bytes, data: memoryview, checksum: int) -> None:
        """Swap the disk copy for the new value; on failure drop the new DRAM copy (the old
        durable value, if any, stays)."""
        assert self.disk is not None
        try:
            if not self._make_room_disk(len(data)):
                raise NoSpace(f"write-through: no room for {format_size(len(data))} on disk (pinned)")
            self.disk.put(key, data, checksum)
        except BaseException:
            self.dram.remove(key)
            self._lru["dram"].pop(key, None)
            raise
        self._touch("disk", key)

    def _make_room_dram(self, n: int) -> bool:
        """Make ``n`` bytes fit; crossing the high watermark demotes down to the low one."""
        need = self.dram.charge(n)
        if need > self.dram.capacity:
            return False
        if self.dram.fits(n) and self.dram.used + need <= self.high * self.dram.capacity:
            return True
        target = max(self.low * self.dram.capacity - need, 0)
        for key in list(self._lru["dram"]):
            if self.dram.fits(n) and self.dram.used <= target:
                break
            if key not in self.pins:
                self._evict_dram(key)
        return self.dram.fits(n)

    def _enforce_watermark(self) -> None:
        if self.dram.used <= self.high * self.dram.capacity:
            return
        target = self.low * self.dram.capacity
        for key in list(self._lru["dram"]):
            if self.dram.used <= target:
                break
            if key not in self.pins:
                self._evict_dram(key)

    def _evict_dram(self, key: bytes) -> None:
        """Demote ``key`` from DRAM to disk (or drop it without a disk tier)."""
        lease = self.dram.lease(key)
        del self._lru["dram"][key]
        if lease is None:
            return
        try:
            if self.disk is not None and key not in self._lru["disk"]:
                try:
                    verify(lease.view, lease.checksum, key, what="dram")
                    if self._make_room_disk(lease.alloc.size):
                        self.disk.put_padded(key, lease.alloc.view(full=True), lease.alloc.size, lease.checksum)
                        self._lru["disk"][key] = None
                        self.counters["demotions"] += 1
                    else:
                        self.counters["evictions.dropped"] += 1
                except Corruption as e:
                    log.warning("dram: dropping corrupt chunk on demotion: %s", e)
                    self.counters["corrupt.dram"] += 1
                except KVStoreError as e:
                    log.warning("disk: demotion failed, chunk dropped: %s", e)
                    self.counters["evictions.dropped"] += 1
            elif self.disk is None:
                self.counters["evictions.dropped"] += 1
            self.counters["evictions.dram"] += 1
        finally:
            lease.release()
            self.dram.remove(key)
            self._note_lost(key)

    def _make_room_disk(self, n: int) -> bool:
        assert self.disk is not None
        if self.disk.charge(n) > self.disk.capacity:
            return False
        for key in list(self._lru["disk"]):
            if self.disk.fits(n):
                break
            if key not in self.pins:
                self.disk.remove(key)
                del self._lru["disk"][key]
                self.counters["evictions.disk"] += 1
                self._note_lost(key)
        return self.disk.fits(n)

    # -- two-phase writes and held reads (for a node serving remote clients) -----

    def reserve(self, n: int) -> Allocation | None:
        """DRAM space for a chunk of ``n`` bytes that the caller fills; ``None`` if no room.

        The caller owns the returned reference: pass it to :meth:`commit` or release it.
        """
        with self._lock:
            if not self._make_room_dram(n):
                return None
            return self.dram.arena.try_alloc(n)

    def commit(self, key: bytes, alloc: Allocation, checksum: int, pin: bool = False,
               sums: np.ndarray | None = None) -> None:
        """Verify the bytes the caller put in ``alloc`` and make them readable as ``key``.

        Ownership of the caller's reference moves to the store, also on failure
        (a :class:`Corruption` releases it).
        """
        if sums is None:
            sums = block_sums(alloc.view(), key)
        if combine(sums, key) != checksum:
            alloc.release()
            raise Corruption(f"commit: checksum mismatch (declared {checksum:#018x}, "
                             f"landed {combine(sums, key):#018x})")
        with self._lock:
            self.dram.put_allocation(key, alloc, checksum, sums)
            self._touch("dram", key)
            self.counters["puts.dram"] += 1
            if pin:
                self.pins.add(key)
            if self.write_through:
                self._write_through(key, alloc.view(), checksum)
            elif self.disk is not None and self.disk.remove(key):
                self._lru["disk"].pop(key, None)  # the old value's disk copy
            self._enforce_watermark()

    def acquire(self, key: bytes) -> Lease | None:
        """Hold ``key``'s bytes in DRAM (promoting from disk) for a reader; ``None`` on a miss.

        Not verified here: the reader verifies what it copies. Release the lease.
        """
        with self._lock:
            lease = self.dram.lease(key)
            if lease is not None:
                self._lru["dram"].move_to_end(key)
                self.counters["hits.dram"] += 1
                return lease
            e = self.disk.entry(key) if self.disk is not None else None
            if self.disk is None or e is None:
                self.counters["misses.not_found"] += 1
                return None
            try:
                alloc = self._promote_locked(key, e)
            except Corruption:
                return None
            if alloc is None:
                self.counters["misses.no_room"] += 1
                return None
            self.counters["hits.disk"] += 1
            lease = self.dram.lease(key)
            self._enforce_watermark()
            return lease

    def _promote_locked(self, key: bytes, e: Entry) -> Allocation | None:
        """Copy a disk chunk into DRAM, verified; ``None`` if DRAM has no room.

        Raises :class:`Corruption` after dropping a damaged chunk. The caller
        enforces the watermark once it is done with the returned allocation
        (which the DRAM tier owns).
        """
        if not self._make_room_for_promotion(key, e.size):
            return None
        alloc = self.dram.arena.try_alloc(e.size)
        if alloc is None:
            return None
        try:
            self._read_disk_locked(key, alloc.view(full=True))
        except BaseException:
            alloc.release()
            raise
        # Verified by the disk read; the block sums serve partial readers.
        self.dram.put_allocation(key, alloc, e.checksum, block_sums(alloc.view(), key))
        self._lru["dram"][key] = None
        self._lru["disk"].move_to_end(key)
        self.counters["promotions"] += 1
        return alloc

    def _read_disk_locked(self, key: bytes, dst: memoryview) -> None:
        """Read and verify from disk; a corrupt chunk is dropped, counted and re-raised."""
        assert self.disk is not None
        try:
            self.disk.read_into(key, dst)
        except Corruption as err:
            log.warning("disk: dropping corrupt chunk: %s", err)
            self._lru["disk"].pop(key, None)
            self.pins.discard(key)
            self.counters["corrupt.disk"] += 1
            self.counters["misses.corrupt"] += 1
            self._note_lost(key)
            raise

    def _make_room_for_promotion(self, key: bytes, n: int) -> bool:
        """Like :meth:`_make_room_dram`, but demotions never push ``key`` itself off disk."""
        pinned = key in self.pins
        self.pins.add(key)
        try:
            return self._make_room_dram(n)
        finally:
            if not pinned:
                self.pins.discard(key)

    def _note_lost(self, key: bytes) -> None:
        """Record a chunk that left every tier without being removed (for the master)."""
        if not any(t.contains(key) for t in self._tiers()):
            self.lost.append(key)

    def entries(self) -> list[tuple[bytes, int, int]]:
        with self._lock:
            out: dict[bytes, tuple[bytes, int, int]] = {}
            for tier in self._tiers():
                for key in tier.keys():
                    e = tier.entry(key)
                    if e is not None and key not in out:
                        out[key] = (key, e.size, e.checksum)
            return list(out.values())

    def take_lost(self) -> list[bytes]:
        with self._lock:
            out, self.lost = self.lost, []
            return out

    def return_lost(self, keys: list[bytes]) -> None:
        with self._lock:
            self.lost[:0] = keys

    # -- reads ---------------------------------------------------------------

    def size_of(self, key: bytes) -> int | None:
        with self._lock:
            for tier in self._tiers():
                e = tier.entry(key)
                if e is not None:
                    return e.size
        return None

    def get_into(self, key: bytes, dst: memoryview) -> int | None:
        """Copy the chunk into ``dst``; returns its size or ``None`` on a miss."""
        with self._lock:
            lease = self.dram.lease(key)
            if lease is None:
                return self._get_disk_locked(key, dst)
            self._lru["dram"].move_to_end(key)
        size = lease.alloc.size
        if len(dst) < size:
            lease.release()
            raise InvalidArgument(f"buffer of {len(dst)} bytes is smaller than the chunk ({size} bytes)")

        def copy(held: Lease) -> int:
            copy_verified(held.view, dst[:size], held.checksum, key, what="dram")
            return size

        return self._read_leased(key, lease, copy)

    def view(self, key: bytes) -> np.ndarray | None:
        """Zero-copy read-only array (DRAM) or a fresh array (disk); ``None`` on a miss."""
        with self._lock:
            lease = self.dram.lease(key)
            if lease is not None:
                self._lru["dram"].move_to_end(key)
        if lease is None:
            size = self.size_of(key)
            if size is None:
                self.count("misses.not_found")
                return None
            out = np.empty(size, dtype=np.uint8)
            return None if self.get_into(key, out.data) is None else out

        def zero_copy(held: Lease) -> np.ndarray:
            verify(held.view, held.checksum, key, what="dram")
            return held.alloc.ndarray_view()

        return self._read_leased(key, lease, zero_copy)

    def _read_leased(self, key: bytes, lease: Lease, read: Callable[[Lease], T]) -> T | None:
        """Run ``read`` outside the lock, then release; a Corruption drops the chunk (a miss)."""
        try:
            out = read(lease)
        except Corruption as e:
            self._on_dram_corrupt(key, lease.alloc, e)
            return None
        finally:
            lease.release()
        self.count("hits.dram")
        return out

    def _get_disk_locked(self, key: bytes, dst: memoryview) -> int | None:
        e = self.disk.entry(key) if self.disk is not None else None
        if self.disk is None or e is None:
            self.counters["misses.not_found"] += 1
            return None
        if len(dst) < e.size:
            raise InvalidArgument(f"buffer of {len(dst)} bytes is smaller than the chunk ({e.size} bytes)")
        self._lru["disk"].move_to_end(key)
        try:
            alloc = self._promote_locked(key, e) if self.promote_on_hit else None
            if alloc is None:
                self._read_disk_locked(key, dst)
        except Corruption:
            return None
        if alloc is not None:
            dst[: e.size] = alloc.view()
            self._enforce_watermark()
        self.counters["hits.disk"] += 1
        return e.size

    def count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def _on_dram_corrupt(self, key: bytes, alloc: Any, err: Corruption) -> None:
        log.warning("dram: dropping corrupt chunk: %s", err)
        with self._lock:
            if self.dram.drop_if(key, alloc):
                self._lru["dram"].pop(key, None)
                self._note_lost(key)
            self.counters["corrupt.dram"] += 1
            self.counters["misses.corrupt"] += 1

    # -- metadata --------------------------------------------------------------

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return any(t.contains(key) for t in self._tiers())

    def remove(self, key: bytes) -> bool:
        with self._lock:
            return self._remove_locked(key, unpin=True)

    def _remove_locked(self, key: bytes, unpin: bool) -> bool:
        found = False
        for tier in self._tiers():
            if tier.remove(key):
                self._lru[tier.capabilities.medium].pop(key, None)
                found = True
        if unpin:
            self.pins.discard(key)
        return found

    def pin(self, key: bytes) -> bool:
        with self._lock:
            if not self.contains(key):
                return False
            self.pins.add(key)
            return True

    def unpin(self, key: bytes) -> bool:
        with self._lock:
            if key not in self.pins:
                return False
            self.pins.discard(key)
            self._enforce_watermark()
            return True

    def _tiers(self) -> list[Tier]:
        return [self.dram] if self.disk is None else [self.dram, self.disk]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            tiers = {
                t.name: {
                    "medium": t.capabilities.medium,
                    "capacity": t.capacity,
                    "used": t.used,
                    "chunks": len(t),
                }
                for t in self._tiers()
            }
            return {"tiers": tiers, "pinned": len(self.pins), "counters": dict(self.counters)}

    def close(self) -> None:
        with self._lock:
            self.dram.close()
            if self.disk is not None:
                self.disk.close()
