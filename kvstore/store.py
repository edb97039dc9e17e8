"""``LocalStore``: the embedded, node-local tiered KV store (optional HBM + DRAM + optional disk).

>>> store = LocalStore(dram="64MiB", disk_dir="/tmp/kv", disk="256MiB")
>>> store.put(key, chunk_bytes)
>>> store.get(key)            # bytearray (a copy), or None on a miss
>>> store.get_view(key)       # zero-copy read-only numpy view, or None
>>> store.get_into(key, buf)  # bytes written into buf, or None

Values and buffers may be CUDA memory (torch CUDA tensors, CuPy arrays). With an
HBM tier (``hbm="8GiB"``) CUDA values land in GPU memory and are demoted to DRAM
under the same watermark policy (:mod:`kvstore.tiers.hbm`); without one they are
copied into DRAM. :meth:`LocalStore.device_view` hands out zero-copy device arrays
and :meth:`LocalStore.export` chunks for another process on the host (CUDA IPC).

Every read is verified against the chunk's checksum (in HBM: its device sum, on the
GPU); a corrupt chunk is dropped, counted and returned as a miss, never as bytes. Keys are ``bytes``
(chunk keys from :func:`kvstore.keys.chunk_keys`) or ``str`` (UTF-8), 1 to
:data:`MAX_KEY_BYTES` long. All methods are thread-safe and blocking.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvstore._types import Buffer, byte_view
from kvstore.checksum import block_sums, combine, verify
from kvstore.config import StoreConfig
from kvstore.devmem import DeviceBuffer, device_buffer
from kvstore.errors import InvalidArgument, NoSpace
from kvstore.keys import Key, check_key
from kvstore.memory import Allocation, Arena
from kvstore.tiers import DiskTier, DramTier, TierManager
from kvstore.tiers.dram import Lease
from kvstore.tiers.hbm import DeviceChunk, HbmDevice, HbmTier
from kvstore.units import format_size

log = logging.getLogger(__name__)

class LocalStore:
    """Embedded tiered store. Build from a :class:`StoreConfig` or keyword arguments."""

    def __init__(self, config: StoreConfig | None = None, *, arena_buffer: Any = None,
                 generations_buffer: Any = None, hbm_device: HbmDevice | None = None,
                 device_copier: Any = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise InvalidArgument("pass either a StoreConfig or keyword arguments, not both")
        self.config = config if config is not None else StoreConfig(**kwargs)
        c = self.config
        # ``arena_buffer``/``generations_buffer``: memory for the DRAM arena and its
        # extent-generation table (shared segments same-host clients map).
        # ``hbm_device``: the GPU work of the HBM tier; ``device_copier``: copies between
        # CUDA buffers and DRAM (a kvstore.client.device.Copier). Default: CUDA through CuPy.
        arena = Arena(c.dram, alignment=c.alignment, pin=c.pin_memory, prefault=c.prefault,
                      buffer=arena_buffer, generations=generations_buffer)
        disk = None
        if c.disk_dir is not None:
            try:
                disk = DiskTier(
                    Path(c.disk_dir),
                    c.disk,
                    alignment=c.alignment,
                    direct_io=c.disk_direct_io,
                    sync=c.disk_sync,
                )
            except BaseException:
                arena.close(force=True)
                raise
        self._m = TierManager(
            DramTier(arena),
            disk,
            high_watermark=c.high_watermark,
            low_watermark=c.low_watermark,
            promote_on_hit=c.promote_on_hit,
            write_through=c.write_through,
        )
        self._hbm: HbmTier | None = None
        # A put moves a key between HBM and DRAM in two steps (store in one tier, drop it
        # from the other): puts of one key are serialized, or two racing puts of it in
        # different tiers could each drop the other's value.
        self._key_locks = [threading.Lock() for _ in range(64)]
        self._copier: Any = device_copier
        self._registered = False
        if c.hbm:
            try:
                if hbm_device is None:
                    from kvstore.tiers.cuda_device import CudaHbmDevice

                    hbm_device = CudaHbmDevice(c.hbm_device)
                self._hbm = HbmTier(
                    c.hbm, hbm_device, alignment=c.alignment, high_watermark=c.high_watermark,
                    low_watermark=c.low_watermark,
                    reserve_dram=self._m.reserve,
                    adopt_dram=lambda key, alloc, checksum, sums: self._m.commit(key, alloc, checksum, sums=sums),
                )
            except BaseException:
                self._m.close()
                raise
        self._closed = False

    # -- single-key API ----------------------------------------------------------

    def put(self, key: Key, value: Buffer | np.ndarray, *, pin: bool = False) -> None:
        """Store ``value`` under ``key`` (replacing any previous value).

        Raises :class:`InvalidArgument` for bad keys/values and :class:`NoSpace`
        when nothing evictable makes room (e.g. everything pinned).
        """
        k = check_key(key)
        dev = device_buffer(value, "value")
        if dev is not None:
            self._put_device(k, dev, pin)
            return
        mv = byte_view(value)
        if len(mv) == 0:
            raise InvalidArgument("value is empty; kvstore stores chunks of at least one byte")
        if len(mv) > self._m.max_value:
            raise InvalidArgument(
                f"value of {format_size(len(mv))} exceeds the largest tier "
                f"({format_size(self._m.max_value)}); raise store.dram or store.disk"
            )
        if self._hbm is None:
            self._m.put(k, mv, pin=pin)
            return
        with self._key_lock(k):
            self._hbm.remove(k)
            self._m.put(k, mv, pin=pin)

    def _key_lock(self, k: bytes) -> threading.Lock:
        return self._key_locks[zlib.crc32(k) & 63]

    def _put_device(self, k: bytes, dev: DeviceBuffer, pin: bool) -> None:
        if dev.nbytes == 0:
            raise InvalidArgument("value is empty; kvstore stores chunks of at least one byte")
        if self._hbm is not None:
            with self._key_lock(k):
                self._hbm.put(k, dev, pin=pin)
                self._m.remove(k)  # (after: a put that fails loses nothing)
            return
        alloc = self.reserve(dev.nbytes)  # no HBM tier: DMA into DRAM, hash there, commit
        try:
            copier = self._device_copier()
            copier.to_host(alloc.view(), dev)
            copier.wait()
            sums = block_sums(alloc.view(), k)
        except BaseException:
            alloc.release()
            raise
        self._m.commit(k, alloc, combine(sums, k), pin=pin, sums=sums)

    def _device_copier(self) -> Any:
        if self._copier is None:
            from kvstore.client.device import cuda_copier

            self._copier = cuda_copier()
        if not self._registered:
            if not self.arena.pinned:  # (store.pin_memory page-locked it already where CUDA was present)
                self._copier.register(self.arena.buffer.data)
            self._registered = True
        return self._copier

    def get(self, key: Key) -> bytearray | None:
        """A verified copy of the value, or ``None`` on a miss (absent or corrupt)."""
        k = check_key(key)
        size = self.size_of(k)
        if size is None:
            self._m.count("misses.not_found")
            return None
        out = bytearray(size)
        got = self._get_into(k, memoryview(out))
        if got is None:
            return None
        if got != size:  # replaced concurrently by a value of another size
            return self.get(k)
        return out

    def get_view(self, key: Key) -> np.ndarray | None:
        """Zero-copy, read-only ``uint8`` array over the stored bytes, or ``None``.

        The bytes stay valid (never evicted or reused) while the array or any
        view of it is alive. A chunk in the HBM tier comes back as a fresh host copy
        (see :meth:`device_view` for one in place).
        """
        k = check_key(key)
        if self._hbm is not None and (size := self._hbm.size_of(k)) is not None:
            out = np.empty(size, dtype=np.uint8)
            got = self._hbm.get_into(k, out.data)
            if got == size:
                return out
            if got is not None or self._hbm.contains(k):
                return self.get_view(k)  # replaced meanwhile
        return self._m.view(k)

    def device_view(self, key: Key) -> Any | None:
        """Zero-copy, verified ``uint8`` device array (CuPy) over a chunk in the HBM tier,
        or ``None`` (absent, not in HBM, or corrupt). The bytes are not reused while the
        array or any view of it is alive; treat it as read-only."""
        k = check_key(key)
        return self._hbm.view(k) if self._hbm is not None else None

    def export(self, key: Key) -> DeviceChunk | None:
        """Hand a chunk in the HBM tier to another process on this host (CUDA IPC):
        it calls :func:`kvstore.tiers.hbm.read_exported` with the result (send it as
        ``to_dict()``). The chunk stays in place until :meth:`release_export`."""
        k = check_key(key)
        return self._hbm.export(k) if self._hbm is not None else None

    def release_export(self, chunk: DeviceChunk) -> None:
        if self._hbm is None:
            raise InvalidArgument("this store has no HBM tier")
        self._hbm.release(chunk)

    def get_into(self, key: Key, buffer: Any) -> int | None:
        """Copy the value into ``buffer``; returns its size, or ``None`` on a miss.

        Raises :class:`InvalidArgument` if ``buffer`` is read-only or smaller
        than the value, before writing anything.
        """
        k = check_key(key)
        dev = device_buffer(buffer, "buffer")
        if dev is not None:
            if dev.readonly:
                raise InvalidArgument("buffer is read-only")
            return self._get_into(k, dev)
        mv = byte_view(buffer, "buffer")
        if mv.readonly:
            raise InvalidArgument("buffer is read-only")
        return self._get_into(k, mv)

    def _get_into(self, k: bytes, dst: memoryview | DeviceBuffer) -> int | None:
        if self._hbm is not None and self._hbm.contains(k):
            got = self._hbm.get_into(k, dst)
            if got is not None:
                return got
        if isinstance(dst, DeviceBuffer):
            return self._dram_to_device(k, dst)
        return self._m.get_into(k, dst)

    def _dram_to_device(self, k: bytes, dst: DeviceBuffer) -> int | None:
        """DMA a DRAM (or disk, promoted) chunk into CUDA memory: verified where it lies
        in the arena first, then copied from the page-locked arena."""
        def dma(held: Lease) -> int:
            size = held.alloc.size
            if len(dst) < size:
                raise InvalidArgument(f"buffer of {len(dst)} bytes is smaller than the value ({size} bytes)")
            verify(held.view, held.checksum, k, what="dram")
            copier = self._device_copier()
            copier.to_device(dst, held.view)
            copier.wait()
            return size

        return self._m.read_held(k, dma)

    def exists(self, key: Key) -> bool:
        k = check_key(key)
        return (self._hbm is not None and self._hbm.contains(k)) or self._m.contains(k)

    def remove(self, key: Key) -> bool:
        """Remove from every tier; ``True`` if it was stored."""
        k = check_key(key)
        in_hbm = self._hbm is not None and self._hbm.remove(k)
        return self._m.remove(k) or in_hbm

    def pin(self, key: Key) -> bool:
        """Keep ``key`` from eviction until :meth:`unpin`; ``False`` if absent."""
        k = check_key(key)
        return (self._hbm is not None and self._hbm.pin(k)) or self._m.pin(k)

    def unpin(self, key: Key) -> bool:
        k = check_key(key)
        in_hbm = self._hbm is not None and self._hbm.unpin(k)
        return self._m.unpin(k) or in_hbm

    def size_of(self, key: Key) -> int | None:
        k = check_key(key)
        if self._hbm is not None and (size := self._hbm.size_of(k)) is not None:
            return size
        return self._m.size_of(k)

    def longest_prefix(self, keys: Sequence[Key]) -> int:
        """How many leading ``keys`` are stored (the engine's cache-hit question)."""
        n = 0
        for key in keys:
            if not self.exists(key):
                break
            n += 1
        return n

    # -- two-phase API (a node daemon serving remote clients uses these) -----------

    @property
    def arena(self) -> Arena:
        """The DRAM arena (offsets of reservations and leases are relative to it)."""
        return self._m.dram.arena

    def reserve(self, size: int) -> Allocation:
        """Arena space for a value of ``size`` bytes that the caller fills in place.

        Pass the allocation to :meth:`commit`, or ``release()`` it to abort.
        Raises :class:`InvalidArgument` for bad sizes, :class:`NoSpace` when full.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidArgument(f"size must be a positive int, got {size!r}")
        if self._m.dram.charge(size) > self._m.dram.capacity:
            raise InvalidArgument(
                f"value of {format_size(size)} exceeds the DRAM tier ({format_size(self._m.dram.capacity)})"
            )
        alloc = self._m.reserve(size)
        if alloc is None:
            raise NoSpace(f"no DRAM room for {format_size(size)} (everything pinned or held)")
        return alloc

    def commit(self, key: Key, alloc: Allocation, checksum: int, *, pin: bool = False,
               sums: np.ndarray | None = None) -> None:
        """Verify ``alloc``'s bytes against ``checksum`` and store them as ``key``.

        ``sums``: the block sums the caller computed as the bytes landed (and checked
        against ``checksum``); the bytes are then not hashed again. Takes over the
        caller's reference. Raises :class:`Corruption` on mismatch (nothing is stored).
        """
        self._m.commit(check_key(key), alloc, checksum, pin=pin, sums=sums)

    def location(self, key: Key) -> tuple[int, int, int, int] | None:
        """``(offset, size, checksum, generation)`` of a DRAM-resident chunk, or ``None``
        (see :meth:`kvstore.memory.Arena.generation`)."""
        return self._m.dram.location(check_key(key))

    def acquire(self, key: Key) -> Lease | None:
        """Hold the value in the arena for an in-place read; ``None`` on a miss.

        The bytes are not verified here: whoever reads them checks ``lease.checksum``.
        Call ``lease.release()`` when done.
        """
        return self._m.acquire(check_key(key))

    def entries(self) -> list[tuple[bytes, int, int]]:
        """``(key, size, checksum)`` of every stored chunk (each key once)."""
        return self._m.entries()

    def take_lost(self) -> list[bytes]:
        """Keys that left the store without ``remove`` since the last call."""
        return self._m.take_lost()

    def return_lost(self, keys: list[bytes]) -> None:
        """Put keys from :meth:`take_lost` back (their report did not get through)."""
        self._m.return_lost(keys)

    # -- batch API -----------------------------------------------------------------

    def put_batch(self, items: Iterable[tuple[Key, Buffer | np.ndarray]], *, pin: bool = False) -> None:
        """Put each ``(key, value)``; all are validated before any is stored."""
        checked = [(check_key(k), v) for k, v in items]
        for k, v in checked:
            self.put(k, v, pin=pin)

    def get_batch(self, keys: Sequence[Key]) -> list[bytearray | None]:
        return [self.get(k) for k in keys]

    def get_into_batch(self, keys: Sequence[Key], buffers: Sequence[Any]) -> list[int | None]:
        if len(keys) != len(buffers):
            raise InvalidArgument(f"{len(keys)} keys but {len(buffers)} buffers")
        return [self.get_into(k, b) for k, b in zip(keys, buffers, strict=True)]

    def exists_batch(self, keys: Sequence[Key]) -> list[bool]:
        return [self.exists(k) for k in keys]

    def remove_batch(self, keys: Sequence[Key]) -> list[bool]:
        return [self.remove(k) for k in keys]

    # -- lifecycle -------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Capacity/used/chunks per tier, pins, and counters (hits, misses by reason,
        evictions, demotions, promotions, corruptions)."""
        out = self._m.stats()
        if self._hbm is not None:
            out["tiers"] = {"hbm": self._hbm.stats(), **out["tiers"]}
            out["pinned"] += self._hbm.pinned
            out["counters"].update(self._hbm.counters)
        return out

    def close(self) -> None:
        """Release memory and close the disk index. Idempotent."""
        if not self._closed:
            self._closed = True
            if self._hbm is not None:
                self._hbm.close()
            self._m.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
