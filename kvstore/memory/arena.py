"""Page-aligned host arena with explicit, reference-counted ownership.

One anonymous ``mmap`` per arena: page aligned, optionally backed by huge pages
and faulted in up front, and page-locked through CUDA when CUDA is present so
GPU copies from it run at full PCIe speed (plain memory otherwise, no error).

Ownership: :meth:`Arena.alloc` returns an :class:`Allocation` holding one
reference. :meth:`Allocation.retain` adds one, :meth:`Allocation.release` drops
one; the bytes return to the arena when the count reaches zero. Releasing past
zero raises (double free). :meth:`Arena.close` refuses to unmap while any
allocation is live and names them (leak detection). Zero-copy views handed to
callers hold a reference that is released when the view is garbage collected,
so bytes under a reader are never reused. Thread-safe.
"""

from __future__ import annotations

import logging
import mmap
import threading
import weakref
from typing import Any

import numpy as np

from kvstore.errors import InvalidArgument, KVStoreError, NoSpace
from kvstore.memory.allocator import ExtentAllocator, align_up
from kvstore.units import format_size

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE


def aligned_buffer(nbytes: int, alignment: int = 4096) -> np.ndarray:
    """A zeroed uint8 array whose data address is ``alignment``-aligned (for O_DIRECT)."""
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    shift = (-raw.ctypes.data) % alignment
    out = raw[shift : shift + nbytes]
    out[:] = 0
    return out


class Allocation:
    """One live extent of an :class:`Arena`. Not constructed directly."""

    __slots__ = ("arena", "offset", "size", "nbytes", "_refs", "__weakref__")

    def __init__(self, arena: Arena, offset: int, size: int, nbytes: int) -> None:
        self.arena = arena
        self.offset = offset
        self.size = size
        """Bytes requested."""
        self.nbytes = nbytes
        """Bytes taken from the arena (size rounded up to the alignment)."""
        self._refs = 1

    @property
    def refs(self) -> int:
        return self._refs

    def view(self, full: bool = False) -> memoryview:
        """Writable view of the requested bytes (``full``: the whole rounded extent).

        Valid while the caller holds a reference.
        """
        if self._refs <= 0:
            raise InvalidArgument(f"use after free of allocation at {self.offset}")
        n = self.nbytes if full else self.size
        return self.arena._mv[self.offset : self.offset + n]

    def address(self) -> int:
        return self.arena.address + self.offset

    def retain(self) -> Allocation:
        with self.arena._lock:
            if self._refs <= 0:
                raise InvalidArgument(f"retain after free of allocation at {self.offset}")
            self._refs += 1
        return self

    def release(self) -> None:
        """Drop one reference; frees the extent at zero. Raises on double free."""
        self.arena._release(self)

    def ndarray_view(self) -> np.ndarray:
        """Read-only uint8 array over the bytes that holds its own reference.

        The reference is released when the array (and every view of it) is
        garbage collected, so the bytes stay valid for as long as anyone can see them.
        """
        self.retain()
        arr = np.frombuffer(self.arena._mv, dtype=np.uint8, count=self.size, offset=self.offset)
        arr.flags.writeable = False
        weakref.finalize(arr, self.release)
        return arr

    def __repr__(self) -> str:
        return f"Allocation(offset={self.offset}, size={self.size}, refs={self._refs})"


class Arena:
    """Fixed-size host memory pool. See the module docstring for the ownership rules."""

    def __init__(
        self,
        capacity: int,
        *,
        alignment: int = 4096,
        pin: str = "auto",
        prefault: bool = True,
        name: str = "dram",
        buffer: Any = None,
        generations: Any = None,
    ) -> None:
        if capacity <= 0:
            raise InvalidArgument(f"arena {name}: capacity must be > 0, got {capacity}")
        self.name = name
        self.capacity = align_up(capacity, PAGE)
        self._owns_map = buffer is None
        if buffer is not None:
            # Memory someone else mapped (e.g. a shared segment peers can map too).
            self._mmap = buffer
            if len(memoryview(buffer)) < capacity:
                raise InvalidArgument(f"arena {name}: buffer smaller than capacity {capacity}")
            self.capacity = capacity
        else:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            if prefault:
                flags |= getattr(mmap, "MAP_POPULATE", 0)
            try:
                self._mmap = mmap.mmap(-1, self.capacity, flags=flags)
            except OSError as e:
                raise NoSpace(f"arena {name}: cannot map {format_size(self.capacity)}: {e}") from e
        if self._owns_map and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                log.debug("arena %s: transparent huge pages unavailable", name)
        self._np = np.frombuffer(self._mmap, dtype=np.uint8, count=self.capacity)
        if prefault and not self._owns_map:
            # Someone else's mapping (a shared segment): MAP_POPULATE there may only map
            # pages, not back them; writing every page once makes later first touches
            # (ours or a peer's through its own mapping) as cheap as any other.
            self._np.fill(0)
        self._mv = self._np.data
        self.address = int(self._np.ctypes.data)
        self._alloc = ExtentAllocator(capacity, alignment)
        # One uint64 per granule: the extent generation of an extent starting there
        # (see :meth:`generation`). ``generations``: memory for it that peers can map.
        slots = self._alloc.capacity // self._alloc.alignment + 1
        self._gens = generation_table(slots, generations)
        self._live: dict[int, Allocation] = {}
        self._lock = threading.Lock()
        self.pinned = _pin_host(self.address, self.capacity, pin, name)
        self._closed = False

    @property
    def buffer(self) -> np.ndarray:
        """The whole arena as a writable uint8 array (for registering with transports)."""
        return self._np

    @property
    def alignment(self) -> int:
        return self._alloc.alignment

    @property
    def used(self) -> int:
        return self._alloc.used

    @property
    def free_bytes(self) -> int:
        return self._alloc.free_bytes

    def rounded(self, nbytes: int) -> int:
        return self._alloc.rounded(nbytes)

    def alloc(self, nbytes: int) -> Allocation:
        """Allocate ``nbytes``; raises :class:`NoSpace` if no free extent fits."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise InvalidArgument(f"arena {self.name}: bad allocation size {nbytes!r}")
        if self._alloc.rounded(nbytes) > self._alloc.capacity:
            raise InvalidArgument(
                f"arena {self.name}: {format_size(nbytes)} exceeds its capacity "
                f"{format_size(self._alloc.capacity)}"
            )
        a = self.try_alloc(nbytes)
        if a is None:
            raise NoSpace(
                f"arena {self.name}: no free extent of {format_size(nbytes)} "
                f"({format_size(self.free_bytes)} free in {self._alloc.fragments()} fragments)"
            )
        return a

    def try_alloc(self, nbytes: int) -> Allocation | None:
        """Like :meth:`alloc` but returns ``None`` when full."""
        with self._lock:
            if self._closed:
                raise InvalidArgument(f"arena {self.name} is closed")
            off = self._alloc.alloc(nbytes)
            if off is None:
                return None
            a = Allocation(self, off, nbytes, self._alloc.rounded(nbytes))
            self._live[off] = a
            self._gens[off // self._alloc.alignment] += 1
            return a

    def generation(self, offset: int) -> int:
        """The extent generation at ``offset``: bumped when an extent starting there is
        allocated or freed and when its content is retired (:meth:`retire`).

        A reader that remembers ``(offset, generation)`` of a value and finds the same
        generation before and after copying knows the extent still held that value
        throughout (the node writes the table; same-host clients map it read-only).
        """
        return int(self._gens[offset // self._alloc.alignment])

    def retire(self, a: Allocation) -> None:
        """Mark ``a``'s content as no longer the stored value (removed, evicted, replaced).

        Bumps its extent generation so one-sided readers holding the old one fall back
        to a leased read; the bytes themselves stay valid while references remain.
        """
        with self._lock:
            self._gens[a.offset // self._alloc.alignment] += 1

    @property
    def generations(self) -> np.ndarray:
        """The generation table (uint64 per :attr:`alignment` granule)."""
        return self._gens

    def _release(self, a: Allocation) -> None:
        with self._lock:
            if a._refs <= 0 or self._live.get(a.offset) is not a:
                raise InvalidArgument(f"arena {self.name}: double free of {a!r}")
            a._refs -= 1
            if a._refs == 0:
                del self._live[a.offset]
                self._gens[a.offset // self._alloc.alignment] += 1  # whatever it held is gone
                self._alloc.free(a.offset, a.nbytes)

    def live(self) -> list[Allocation]:
        """Allocations not yet freed (for leak checks)."""
        with self._lock:
            return list(self._live.values())

    def close(self, *, force: bool = False) -> None:
        """Unmap the arena. Raises if allocations are live, unless ``force``."""
        with self._lock:
            if self._closed:
                return
            if self._live and not force:
                leaked = list(self._live.values())[:5]
                raise KVStoreError(
                    f"arena {self.name}: closing with {len(self._live)} live allocation(s) "
                    f"(leak), e.g. {leaked}; release them or close(force=True)"
                )
            self._closed = True
        if self.pinned:
            _unpin_host(self.address)
        try:
            self._mv.release()
        except BufferError:
            log.warning("arena %s: views still exported at close; unmapping deferred", self.name)
            return
        del self._np
        if not self._owns_map:
            return
        try:
            self._mmap.close()
        except BufferError:
            # A zero-copy view outlives the arena; the mapping goes when it does.
            log.warning("arena %s: views still exported at close; unmapping deferred", self.name)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(force=exc[0] is not None)


GENERATION_BYTES = 8


def generation_table_bytes(capacity: int, alignment: int) -> int:
    """Bytes of the generation table of an arena of ``capacity`` bytes."""
    return (align_up(capacity, alignment) // alignment + 1) * GENERATION_BYTES


def generation_table(slots: int, buffer: Any = None) -> np.ndarray:
    """A zeroed uint64 table of ``slots`` entries, over ``buffer`` when given."""
    if buffer is None:
        return np.zeros(slots, dtype=np.uint64)
    table = np.frombuffer(buffer, dtype=np.uint64, count=slots)
    table[:] = 0
    return table


def _cuda_runtime() -> Any | None:
    """CuPy's CUDA runtime if CuPy and a device are present (imported lazily)."""
    try:
        import cupy  # noqa: PLC0415

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy.cuda.runtime
    except ImportError:
        return None
    except Exception as e:  # noqa: BLE001 - CUDA driver errors have no common base
        log.info("CUDA not usable for pinning: %s", e)
    return None


def _pin_host(address: int, nbytes: int, mode: str, name: str) -> bool:
    if mode == "off":
        return False
    rt = _cuda_runtime()
    if rt is None:
        if mode == "on":
            raise InvalidArgument(f"arena {name}: pin_memory='on' but no CUDA device is usable")
        return False
    rt.hostRegister(address, nbytes, 0)
    log.info("arena %s: %s pinned with cudaHostRegister", name, format_size(nbytes))
    return True


def _unpin_host(address: int) -> None:
    rt = _cuda_runtime()
    if rt is not None:
        rt.hostUnregister(address)
