"""Tier manager: placement, watermark eviction, demotion, promotion, pins.

Policy only; bytes move through the tiers' own methods. New chunks land in the
DRAM tier. When its use passes the high watermark, the eviction policy's
coldest unpinned chunks (:mod:`kvstore.tiers.policy`, LRU by default) are
demoted to the disk tier (or dropped without one) until use falls below the low
watermark. A disk hit is promoted back to DRAM; the disk copy is kept
(inclusive caching), so evicting a promoted chunk again costs no write. Pinned
chunks are never evicted from any tier.

The manager talks to tiers through their contract (:mod:`kvstore.tiers.base`):
the top tier must also lease its bytes in place (:class:`LeasingTier`, the
``zero_copy`` capability), the lower tier is any :class:`Tier`.

Thread-safety: one lock guards the metadata (placement, policy order, pins,
counters); **no disk I/O and no large copy runs under it**, so a stream of
disk hits or demotions never makes a DRAM hit or a commit wait for the disk:

* demotion: victims are detached from DRAM under the lock (their extent
  generation moves, but a hold keeps the bytes, and readers are still served
  from it), written to disk outside it, then recorded;
* promotion: DRAM space is taken under the lock, the disk read runs outside it,
  and the chunk is installed only if the disk copy it read is still the
  current one (concurrent readers of the same key wait for one promotion);
* puts copy into freshly allocated arena space outside the lock.

Disk writes are serialized among themselves (a separate lock), and a value
replaced or removed while its old bytes are being demoted is never left on
disk.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from kvstore.checksum import block_sums, combine, copy_summed, copy_verified, verify
from kvstore.errors import Corruption, InvalidArgument, KVStoreError, NoSpace
from kvstore.memory import Allocation, Arena
from kvstore.tiers.base import Entry, Tier
from kvstore.tiers.dram import Lease
from kvstore.tiers.policy import POLICIES
from kvstore.units import format_size

log = logging.getLogger(__name__)
T = TypeVar("T")
_PROMOTION_WAIT = 60.0
NO_ROOM = "no-room"
"""What a promotion returns when the chunk is on disk but DRAM has no room for it."""
_ROOM_ROUNDS = 16


class LeasingTier(Protocol):
    """What the manager needs of its top tier beyond :class:`Tier`: chunks in an
    :class:`Arena` it can hold in place, adopt and drop by identity."""

    name: str
    arena: Arena

    @property
    def capacity(self) -> int: ...

    @property
    def used(self) -> int: ...

    def charge(self, nbytes: int) -> int: ...

    def fits(self, nbytes: int) -> bool: ...

    def lease(self, key: bytes) -> Lease | None: ...

    def location(self, key: bytes) -> tuple[int, int, int, int] | None: ...

    def put_allocation(self, key: bytes, alloc: Allocation, checksum: int, sums: np.ndarray) -> None: ...

    def drop_if(self, key: bytes, alloc: Allocation) -> bool: ...

    def remove(self, key: bytes) -> bool: ...

    def entry(self, key: bytes) -> Entry | None: ...

    def contains(self, key: bytes) -> bool: ...

    def keys(self) -> Iterator[bytes]: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...


@dataclass
class _Detached:
    """A chunk taken out of DRAM on its way to disk; ``lease`` keeps its bytes."""

    key: bytes
    lease: Lease
    on_disk: bool
    """A disk copy already exists (it was promoted): nothing to write."""
    superseded: bool = False
    """Removed or replaced meanwhile: its bytes must not stay on disk."""


class TierManager:
    def __init__(
        self,
        dram: LeasingTier,
        disk: Tier | None,
        *,
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        promote_on_hit: bool = True,
        write_through: bool = False,
        policy: str = "lru",
    ) -> None:
        if policy not in POLICIES:
            raise InvalidArgument(f"unknown eviction policy {policy!r}; known: {sorted(POLICIES)}")
        self.dram = dram
        self.disk = disk
        self.high = high_watermark
        self.low = low_watermark
        self.promote_on_hit = promote_on_hit
        self.write_through = write_through and disk is not None
        self._lock = threading.RLock()
        self._disk_write = threading.Lock()  # disk writes, one at a time, never under _lock
        self._order = {"dram": POLICIES[policy](), "disk": POLICIES[policy]()}
        self._demoting: dict[bytes, _Detached] = {}
        self._promoting: dict[bytes, threading.Event] = {}
        self._disk_reads: Counter[bytes] = Counter()  # disk copies being read: not evicted meanwhile
        self.pins: set[bytes] = set()
        self.lost: list[bytes] = []
        self.counters: Counter[str] = Counter()
        if disk is not None:
            for key in disk.keys():
                self._order["disk"].touch(key)
            self.counters["corrupt.disk.index"] += getattr(disk, "corrupt_on_open", 0)

    @property
    def max_value(self) -> int:
        return max(self.dram.capacity, self.disk.capacity if self.disk is not None else 0)

    # -- writes --------------------------------------------------------------

    def put(self, key: bytes, data: memoryview, pin: bool = False) -> None:
        # A replaced value stays readable until its successor is in place: each tier
        # swaps atomically, and a copy left in another tier goes only afterwards (with
        # write-through the disk copy is swapped first), so a crash mid-put loses
        # nothing that was acknowledged before.
        n = len(data)
        alloc = self._alloc_dram(n)
        if alloc is not None:
            try:
                sums = copy_summed(data, alloc.view(), key)
            except BaseException:
                alloc.release()
                raise
            self._adopt(key, alloc, combine(sums, key), sums, pin, source=data)
            return
        if self.disk is None or not self._room_disk(n):
            raise NoSpace(
                f"no room for {format_size(n)}: DRAM has {format_size(self.dram.capacity - self.dram.used)} "
                f"free and {len(self.pins)} pinned chunk(s)"
                + ("" if self.disk is not None else "; configure a disk tier (store.disk_dir) for more room"))
        self._supersede(key)
        with self._disk_write:
            self.disk.put(key, data)
        with self._lock:
            self._order["disk"].touch(key)
            self.counters["puts.disk"] += 1
            if self.dram.remove(key):
                self._order["dram"].discard(key)
            if pin:
                self.pins.add(key)

    def reserve(self, n: int) -> Allocation | None:
        """DRAM space for a chunk of ``n`` bytes that the caller fills; ``None`` if no room.

        The caller owns the returned reference: pass it to :meth:`commit` or release it.
        """
        return self._alloc_dram(n)

    def commit(self, key: bytes, alloc: Allocation, checksum: int, pin: bool = False,
               sums: np.ndarray | None = None) -> None:
        """Verify the bytes the caller put in ``alloc`` and make them readable as ``key``.

        ``sums``: block sums the caller computed as the bytes landed (no second pass).
        Ownership of the caller's reference moves to the store, also on failure
        (a :class:`Corruption` releases it).
        """
        if sums is None:
            sums = block_sums(alloc.view(), key)
        if combine(sums, key) != checksum:
            alloc.release()
            raise Corruption(f"commit: checksum mismatch (declared {checksum:#018x}, "
                             f"landed {combine(sums, key):#018x})")
        self._adopt(key, alloc, checksum, sums, pin, source=None)

    def _adopt(self, key: bytes, alloc: Allocation, checksum: int, sums: np.ndarray, pin: bool,
               source: memoryview | None) -> None:
        """Make a filled, verified allocation the value of ``key`` (write-through first)."""
        if self.write_through:
            assert self.disk is not None
            self._supersede(key)
            try:
                if not self._room_disk(alloc.size):
                    raise NoSpace(f"write-through: no room for {format_size(alloc.size)} on disk (pinned)")
                with self._disk_write:
                    self.disk.put(key, alloc.view() if source is None else source, checksum)
            except BaseException:
                alloc.release()  # the old value, if any, stays in both tiers
                raise
        with self._lock:
            self._supersede(key)
            self.dram.put_allocation(key, alloc, checksum, sums)
            self._order["dram"].touch(key)
            self.counters["puts.dram"] += 1
            if pin:
                self.pins.add(key)
            if self.write_through:
                self._order["disk"].touch(key)
            elif self.disk is not None and self.disk.remove(key):
                self._order["disk"].discard(key)  # the old value's disk copy
            victims = self._detach_over(self.high, self.low)
        self._demote(victims)

    def _supersede(self, key: bytes) -> None:
        with self._lock:
            d = self._demoting.get(key)
            if d is not None:
                d.superseded = True

    # -- room: detach under the lock, demote outside it --------------------------

    def _alloc_dram(self, n: int) -> Allocation | None:
        """Arena space for ``n`` bytes, demoting what must go first; ``None`` if no room."""
        need = self.dram.charge(n)
        if need > self.dram.capacity:
            return None
        for _ in range(_ROOM_ROUNDS):
            with self._lock:
                if self.dram.fits(n) and self.dram.used + need <= self.high * self.dram.capacity:
                    alloc = self.dram.arena.try_alloc(n)
                    if alloc is not None:
                        return alloc
                victims = self._detach_over(0.0, max(self.low * self.dram.capacity - need, 0) / self.dram.capacity,
                                            need=n)
                if not victims:
                    return self.dram.arena.try_alloc(n)
            self._demote(victims)
        with self._lock:
            return self.dram.arena.try_alloc(n)

    def _detach_over(self, high: float, low: float, need: int = 0) -> list[_Detached]:
        """Under the lock: once use passes ``high`` of capacity (or ``need`` bytes do
        not fit), detach the coldest unpinned chunks until use would fall to ``low``."""
        cap = self.dram.capacity
        if self.dram.used <= high * cap and (need == 0 or self.dram.fits(need)):
            return []
        out: list[_Detached] = []
        freed = 0
        for key in self._order["dram"].victims():
            if self.dram.used - freed <= low * cap and (need == 0 or self.dram.fits(need) or freed >= need):
                break
            if key in self.pins:
                continue
            d = self._detach(key)
            if d is not None:
                out.append(d)
                freed += self.dram.charge(d.lease.alloc.size)
        return out

    def _detach(self, key: bytes) -> _Detached | None:
        self._order["dram"].discard(key)
        lease = self.dram.lease(key)
        if lease is None:
            return None
        self.dram.remove(key)  # retires the extent; the lease keeps the bytes
        # already on disk only if the disk holds *this* version: a key written again (after
        # a remove that missed the disk copy, or a replace) may have an older one there
        ent = self.disk.entry(key) if self.disk is not None and key in self._order["disk"] else None
        d = _Detached(key, lease, on_disk=ent is not None and ent.checksum == lease.checksum)
        self._demoting[key] = d
        return d

    def _demote(self, victims: list[_Detached]) -> None:
        """Outside the lock: write detached chunks to disk (or drop them), record, free."""
        for d in victims:
            key, lease = d.key, d.lease
            written = False
            try:
                if self.disk is not None and not d.on_disk and not d.superseded:
                    verify(lease.view, lease.checksum, key, what="dram")
                    if self._room_disk(lease.alloc.size):
                        with self._disk_write:
                            if not d.superseded:
                                self.disk.put_padded(key, lease.alloc.view(full=True), lease.alloc.size,
                                                     lease.checksum)
                                written = True
            except Corruption as e:
                log.warning("dram: dropping corrupt chunk on demotion: %s", e)
                self.count("corrupt.dram")
            except KVStoreError as e:
                log.warning("disk: demotion failed, chunk dropped: %s", e)
            with self._lock:
                if self._demoting.get(key) is d:
                    del self._demoting[key]
                if written and d.superseded and self.disk is not None:
                    ent = self.disk.entry(key)
                    if ent is not None and ent.checksum == lease.checksum:
                        self.disk.remove(key)  # removed or replaced while it was being written
                elif written:
                    self._order["disk"].touch(key)
                    self.counters["demotions"] += 1
                if not written and not d.on_disk and not d.superseded:
                    self.counters["evictions.dropped"] += 1
                self.counters["evictions.dram"] += 1
                if not d.superseded:
                    self._note_lost(key)
            lease.release()

    def _room_disk(self, n: int) -> bool:
        """Make ``n`` bytes fit on disk by evicting its coldest unpinned chunks (metadata only)."""
        assert self.disk is not None
        if self.disk.charge(n) > self.disk.capacity:
            return False
        with self._lock:
            for key in self._order["disk"].victims():
                if self.disk.fits(n):
                    break
                if key not in self.pins and not self._disk_reads[key]:
                    self.disk.remove(key)
                    self._order["disk"].discard(key)
                    self.counters["evictions.disk"] += 1
                    self._note_lost(key)
            return self.disk.fits(n)

    # -- reads ---------------------------------------------------------------

    def _lease_locked(self, key: bytes) -> Lease | None:
        """A hold on ``key``'s DRAM bytes (also while they are being demoted)."""
        lease = self.dram.lease(key)
        if lease is not None:
            self._order["dram"].touch(key)
            return lease
        d = self._demoting.get(key)
        if d is None or d.superseded:
            return None
        a = d.lease.alloc.retain()
        return Lease(a, d.lease.checksum, self.dram.arena.generation(a.offset), d.lease.sums)

    def acquire(self, key: bytes) -> Lease | None:
        """Hold ``key``'s bytes in DRAM (promoting from disk) for a reader; ``None`` on a miss.

        Not verified here: the reader verifies what it copies. Release the lease.
        """
        with self._lock:
            lease = self._lease_locked(key)
            if lease is not None:
                self.counters["hits.dram"] += 1
                return lease
        got = self._promote(key)
        if got == NO_ROOM:
            self.count("misses.no_room")
        if not isinstance(got, Lease):
            return None
        self.count("hits.disk")
        return got

    def _promote(self, key: bytes) -> Lease | str | None:
        """Copy a disk chunk into DRAM (disk read outside the lock) and hold it; ``None``
        on a miss (absent or corrupt: counted), :data:`NO_ROOM` if DRAM has no room."""
        while True:
            with self._lock:
                lease = self._lease_locked(key)
                if lease is not None:
                    return lease
                e = self.disk.entry(key) if self.disk is not None else None
                if e is None:
                    self.counters["misses.not_found"] += 1
                    return None
                busy = self._promoting.get(key)
                if busy is None:
                    done = self._promoting[key] = threading.Event()
                    self._disk_reads[key] += 1
            if busy is not None:  # another reader is promoting it: wait, then take its result
                busy.wait(_PROMOTION_WAIT)
                continue
            try:
                return self._promote_once(key, e)
            finally:
                with self._lock:
                    del self._promoting[key]
                    self._disk_reads[key] -= 1
                    if not self._disk_reads[key]:
                        del self._disk_reads[key]
                done.set()

    def _promote_once(self, key: bytes, e: Entry) -> Lease | str | None:
        assert self.disk is not None
        alloc = self._alloc_dram(e.size)
        if alloc is None:
            return NO_ROOM
        try:
            self.disk.read_into(key, alloc.view(full=True))
            sums = block_sums(alloc.view(), key)
        except Corruption as err:
            alloc.release()
            self._on_disk_corrupt(key, e, err)
            return None
        except BaseException:
            alloc.release()
            raise
        with self._lock:
            if self.disk.entry(key) != e or self.dram.contains(key):
                alloc.release()  # replaced or removed meanwhile: not this copy
                lease = self._lease_locked(key)
                if lease is None:
                    self.counters["misses.not_found"] += 1
                return lease
            self.dram.put_allocation(key, alloc, e.checksum, sums)
            self._order["dram"].touch(key)
            self._order["disk"].touch(key)
            self.counters["promotions"] += 1
            lease = self.dram.lease(key)
            victims = self._detach_over(self.high, self.low)
        self._demote(victims)
        return lease

    def _on_disk_corrupt(self, key: bytes, e: Entry, err: Corruption) -> None:
        with self._lock:
            if self.disk is not None and self.disk.entry(key) is not None:
                return  # another copy was written meanwhile: what we read was not it
            log.warning("disk: dropping corrupt chunk: %s", err)
            self._order["disk"].discard(key)
            self.pins.discard(key)
            self.counters["corrupt.disk"] += 1
            self.counters["misses.corrupt"] += 1
            self._note_lost(key)

    def get_into(self, key: bytes, dst: memoryview) -> int | None:
        """Copy the chunk into ``dst``; returns its size or ``None`` on a miss."""
        with self._lock:
            lease = self._lease_locked(key)
            hit = "hits.dram"
            if lease is None:
                e = self.disk.entry(key) if self.disk is not None else None
                if e is None:
                    self.counters["misses.not_found"] += 1
                    return None
                if len(dst) < e.size:
                    raise InvalidArgument(f"buffer of {len(dst)} bytes is smaller than the chunk ({e.size} bytes)")
        if lease is None:
            assert e is not None
            got = self._promote(key) if self.promote_on_hit else NO_ROOM
            if got == NO_ROOM:  # not promoted: straight from disk into the caller's buffer
                return self._read_disk(key, e, dst)
            if not isinstance(got, Lease):
                return None
            lease, hit = got, "hits.disk"
        size = lease.alloc.size
        if len(dst) < size:
            lease.release()
            raise InvalidArgument(f"buffer of {len(dst)} bytes is smaller than the chunk ({size} bytes)")

        def copy(held: Lease) -> int:
            copy_verified(held.view, dst[:size], held.checksum, key, what="dram")
            return size

        return self._read_leased(key, lease, copy, hit)

    def _read_disk(self, key: bytes, e: Entry, dst: memoryview) -> int | None:
        assert self.disk is not None
        with self._lock:
            self._disk_reads[key] += 1
            self._order["disk"].touch(key)
        try:
            self.disk.read_into(key, dst)
        except Corruption as err:
            self._on_disk_corrupt(key, e, err)
            return None
        finally:
            with self._lock:
                self._disk_reads[key] -= 1
                if not self._disk_reads[key]:
                    del self._disk_reads[key]
        self.count("hits.disk")
        return e.size

    def view(self, key: bytes) -> np.ndarray | None:
        """Zero-copy read-only array (DRAM) or a fresh array (disk); ``None`` on a miss."""
        with self._lock:
            lease = self._lease_locked(key)
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

        return self._read_leased(key, lease, zero_copy, "hits.dram")

    def read_held(self, key: bytes, read: Callable[[Lease], T]) -> T | None:
        """Run ``read`` on ``key``'s bytes held in DRAM (promoted from disk if need be), for a
        reader that moves them its own way (a DMA to a GPU) and verifies them first; a
        :class:`Corruption` it raises drops the chunk (a miss). ``None`` on a miss."""
        lease = self.acquire(key)  # (counts the hit)
        return None if lease is None else self._read_leased(key, lease, read, None)

    def _read_leased(self, key: bytes, lease: Lease, read: Callable[[Lease], T], hit: str | None) -> T | None:
        """Run ``read`` outside the lock, then release; a Corruption drops the chunk (a miss)."""
        try:
            out = read(lease)
        except Corruption as e:
            self._on_dram_corrupt(key, lease.alloc, e)
            return None
        finally:
            lease.release()
        if hit is not None:
            self.count(hit)
        return out

    def _on_dram_corrupt(self, key: bytes, alloc: Any, err: Corruption) -> None:
        log.warning("dram: dropping corrupt chunk: %s", err)
        with self._lock:
            if self.dram.drop_if(key, alloc):
                self._order["dram"].discard(key)
                self._note_lost(key)
            self.counters["corrupt.dram"] += 1
            self.counters["misses.corrupt"] += 1

    # -- metadata --------------------------------------------------------------

    def _note_lost(self, key: bytes) -> None:
        """Record a chunk that left every tier without being removed (for the master)."""
        if not self._holds(key):
            self.lost.append(key)

    def _holds(self, key: bytes) -> bool:
        d = self._demoting.get(key)
        return (d is not None and not d.superseded) or any(t.contains(key) for t in self._tiers())

    def entries(self) -> list[tuple[bytes, int, int]]:
        """``(key, size, checksum)`` of every stored chunk (each key once)."""
        with self._lock:
            out: dict[bytes, tuple[bytes, int, int]] = {}
            for d in self._demoting.values():
                if not d.superseded:
                    out[d.key] = (d.key, d.lease.alloc.size, d.lease.checksum)
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

    def size_of(self, key: bytes) -> int | None:
        with self._lock:
            d = self._demoting.get(key)
            if d is not None and not d.superseded:
                return d.lease.alloc.size
            for tier in self._tiers():
                e: Entry | None = tier.entry(key)
                if e is not None:
                    return e.size
        return None

    def count(self, name: str) -> None:
        with self._lock:
            self.counters[name] += 1

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return self._holds(key)

    def remove(self, key: bytes) -> bool:
        with self._lock:
            d = self._demoting.get(key)
            found = d is not None and not d.superseded
            if d is not None:
                d.superseded = True
            for name, tier in (("dram", self.dram), ("disk", self.disk)):
                if tier is not None and tier.remove(key):
                    self._order[name].discard(key)
                    found = True
            self.pins.discard(key)
            return found

    def pin(self, key: bytes) -> bool:
        with self._lock:
            if not self._holds(key):
                return False
            self.pins.add(key)
            return True

    def unpin(self, key: bytes) -> bool:
        with self._lock:
            if key not in self.pins:
                return False
            self.pins.discard(key)
            victims = self._detach_over(self.high, self.low)
        self._demote(victims)
        return True

    def _tiers(self) -> list[Any]:
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
