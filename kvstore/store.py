"""``LocalStore``: the embedded, node-local tiered KV store (DRAM + optional disk).

>>> store = LocalStore(dram="64MiB", disk_dir="/tmp/kv", disk="256MiB")
>>> store.put(key, chunk_bytes)
>>> store.get(key)            # bytearray (a copy), or None on a miss
>>> store.get_view(key)       # zero-copy read-only numpy view, or None
>>> store.get_into(key, buf)  # bytes written into buf, or None

Every read is verified against the chunk's checksum; a corrupt chunk is
dropped, counted and returned as a miss, never as bytes. Keys are ``bytes``
(chunk keys from :func:`kvstore.keys.chunk_keys`) or ``str`` (UTF-8), 1 to
:data:`MAX_KEY_BYTES` long. All methods are thread-safe and blocking.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvstore._types import Buffer, byte_view
from kvstore.config import StoreConfig
from kvstore.errors import InvalidArgument, NoSpace
from kvstore.keys import Key, check_key
from kvstore.memory import Allocation, Arena
from kvstore.tiers import DiskTier, DramTier, TierManager
from kvstore.tiers.dram import Lease
from kvstore.units import format_size

log = logging.getLogger(__name__)

class LocalStore:
    """Embedded tiered store. Build from a :class:`StoreConfig` or keyword arguments."""

    def __init__(self, config: StoreConfig | None = None, *, arena_buffer: Any = None,
                 generations_buffer: Any = None, **kwargs: Any) -> None:
        if config is not None and kwargs:
            raise InvalidArgument("pass either a StoreConfig or keyword arguments, not both")
        self.config = config if config is not None else StoreConfig(**kwargs)
        c = self.config
        # ``arena_buffer``/``generations_buffer``: memory for the DRAM arena and its
        # extent-generation table (shared segments same-host clients map).
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
        self._closed = False

    # -- single-key API ----------------------------------------------------------

    def put(self, key: Key, value: Buffer | np.ndarray, *, pin: bool = False) -> None:
        """Store ``value`` under ``key`` (replacing any previous value).

        Raises :class:`InvalidArgument` for bad keys/values and :class:`NoSpace`
        when nothing evictable makes room (e.g. everything pinned).
        """
        k = check_key(key)
        mv = byte_view(value)
        if len(mv) == 0:
            raise InvalidArgument("value is empty; kvstore stores chunks of at least one byte")
        if len(mv) > self._m.max_value:
            raise InvalidArgument(
                f"value of {format_size(len(mv))} exceeds the largest tier "
                f"({format_size(self._m.max_value)}); raise store.dram or store.disk"
            )
        self._m.put(k, mv, pin=pin)

    def get(self, key: Key) -> bytearray | None:
        """A verified copy of the value, or ``None`` on a miss (absent or corrupt)."""
        k = check_key(key)
        size = self._m.size_of(k)
        if size is None:
            self._m.count("misses.not_found")
            return None
        out = bytearray(size)
        got = self._m.get_into(k, memoryview(out))
        if got is None:
            return None
        if got != size:  # replaced concurrently by a value of another size
            return self.get(k)
        return out

    def get_view(self, key: Key) -> np.ndarray | None:
        """Zero-copy, read-only ``uint8`` array over the stored bytes, or ``None``.

        The bytes stay valid (never evicted or reused) while the array or any
        view of it is alive.
        """
        return self._m.view(check_key(key))

    def get_into(self, key: Key, buffer: Any) -> int | None:
        """Copy the value into ``buffer``; returns its size, or ``None`` on a miss.

        Raises :class:`InvalidArgument` if ``buffer`` is read-only or smaller
        than the value, before writing anything.
        """
        k = check_key(key)
        mv = byte_view(buffer, "buffer")
        if mv.readonly:
            raise InvalidArgument("buffer is read-only")
        return self._m.get_into(k, mv)

    def exists(self, key: Key) -> bool:
        return self._m.contains(check_key(key))

    def remove(self, key: Key) -> bool:
        """Remove from every tier; ``True`` if it was stored."""
        return self._m.remove(check_key(key))

    def pin(self, key: Key) -> bool:
        """Keep ``key`` from eviction until :meth:`unpin`; ``False`` if absent."""
        return self._m.pin(check_key(key))

    def unpin(self, key: Key) -> bool:
        return self._m.unpin(check_key(key))

    def size_of(self, key: Key) -> int | None:
        return self._m.size_of(check_key(key))

    def longest_prefix(self, keys: Sequence[Key]) -> int:
        """How many leading ``keys`` are stored (the engine's cache-hit question)."""
        n = 0
        for key in keys:
            if not self._m.contains(check_key(key)):
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
        return self._m.stats()

    def close(self) -> None:
        """Release memory and close the disk index. Idempotent."""
        if not self._closed:
            self._closed = True
            self._m.close()

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
