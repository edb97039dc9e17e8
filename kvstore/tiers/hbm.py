"""The HBM tier: chunks in GPU memory, above the DRAM tier of a :class:`~kvstore.LocalStore`.

One device allocation made at start (the *device arena*), cut into extents by the
same first-fit allocator as the DRAM arena. CUDA values put into the store land
here; when use passes the high watermark, the coldest unpinned chunks nobody reads
are demoted into the DRAM tier (and on to disk under its own watermarks) until use
falls below the low watermark; a chunk DRAM has no room for is dropped.

Integrity: every chunk carries its device sum (:mod:`kvstore.device_sum`), computed
on the GPU by ``csrc/cuda/device_sum.cu`` as the bytes land (one kernel copies and
sums). Every read verifies on the device:

* into CUDA memory: one kernel copies and sums (the source is read once); a
  mismatch is a miss (the destination's content is then undefined, as for any
  miss) and the chunk is dropped;
* into host memory: the chunk is summed where it lies first and copied off the
  device only if it verified;
* zero-copy device views (:meth:`HbmTier.view`) are summed before they are handed
  out and keep their extent from reuse while alive;
* a demotion verifies before the copy to DRAM and hashes the landed bytes (XXH3
  block sums) for the DRAM tier.

Same-host processes can read chunks without touching host memory: :meth:`export`
hands out a :class:`DeviceChunk` (the arena's CUDA IPC handle, where the chunk lies,
its device sum) and holds the chunk until released; :func:`read_exported` in the
other process opens the handle once and copies device to device, verifying as it
copies. The device work goes through an :class:`HbmDevice`: the CUDA one is
:class:`kvstore.tiers.cuda_device.CudaHbmDevice` (CuPy, loaded only when an HBM tier
is configured); tests on machines without a GPU use
:class:`kvstore.testing.fake_cuda.HostHbmDevice`.

Thread-safety: one lock; device work runs on one stream of the tier, each call
waits for its own copies (calls are blocking, like the rest of ``LocalStore``).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from kvstore.checksum import block_sums, combine, key_seed
from kvstore.device_sum import finish
from kvstore.devmem import DeviceBuffer
from kvstore.errors import InvalidArgument, KVStoreError, NoSpace
from kvstore.memory import Allocation
from kvstore.memory.allocator import ExtentAllocator
from kvstore.units import format_size

log = logging.getLogger(__name__)

WORD = 8
"""The device-sum kernels read 8-byte words: copying and summing in one kernel wants
both ends aligned to this; otherwise a plain copy and a separate sum run."""


class HbmDevice(Protocol):
    """The GPU work of the HBM tier, queued in order on one stream.

    ``sum`` queues the device-sum kernel over ``src`` (copying each word into ``dst``
    too, when given: both 8-byte aligned); :meth:`wait` blocks until everything
    queued has run and returns the kernels' totals in the order they were queued
    (finish them with :func:`kvstore.device_sum.finish`)."""

    device_id: int

    def alloc(self, nbytes: int) -> DeviceBuffer: ...

    def free(self, buf: DeviceBuffer) -> None: ...

    def to_device(self, dst: DeviceBuffer, src: memoryview) -> None: ...

    def to_host(self, dst: memoryview, src: DeviceBuffer) -> None: ...

    def copy(self, dst: DeviceBuffer, src: DeviceBuffer) -> None: ...

    def sum(self, src: DeviceBuffer, seed: int, dst: DeviceBuffer | None = None) -> None: ...

    def after_callers(self) -> None:
        """Order the tier's stream after work the caller queued on its current streams."""

    def wait(self) -> list[int]: ...

    def view(self, buf: DeviceBuffer) -> Any:
        """A ``uint8`` device array over ``buf`` (keeps ``buf.owner`` alive)."""

    def ipc_handle(self, buf: DeviceBuffer) -> bytes:
        """The CUDA IPC handle of an allocation made by :meth:`alloc`."""

    def open_ipc(self, handle: bytes, nbytes: int) -> DeviceBuffer:
        """Another process's allocation, by its handle (opened once per handle)."""


@dataclass(frozen=True)
class DeviceChunk:
    """Where an exported chunk lies in its owner's device arena (plain data: send it as
    msgpack or JSON). Valid until the owner releases the export."""

    handle: bytes
    arena_bytes: int
    device_id: int
    offset: int
    size: int
    dsum: int
    key: bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceChunk:
        return cls(bytes(d["handle"]), int(d["arena_bytes"]), int(d["device_id"]), int(d["offset"]),
                   int(d["size"]), int(d["dsum"]), bytes(d["key"]))


class _Extent:
    __slots__ = ("offset", "size", "dsum", "refs", "live")

    def __init__(self, offset: int, size: int, dsum: int) -> None:
        self.offset, self.size, self.dsum = offset, size, dsum
        self.refs = 0  # readers, views and exports holding the bytes
        self.live = True  # still the chunk of its key


ReserveDram = Callable[[int], Allocation | None]
"""DRAM space for a demoted chunk of the given size, or None when there is none."""
Adopt = Callable[[bytes, Allocation, int, np.ndarray], None]
"""Hand a filled DRAM allocation (checksum, block sums) to the DRAM tier."""


class HbmTier:
    """Device-arena tier. Keys are ``bytes``; values are :class:`DeviceBuffer` or host views."""

    name = "hbm"

    def __init__(self, capacity: int, device: HbmDevice, *, alignment: int = 4096,
                 high_watermark: float = 0.95, low_watermark: float = 0.85,
                 reserve_dram: ReserveDram | None = None, adopt_dram: Adopt | None = None) -> None:
        if capacity < alignment:
            raise InvalidArgument(f"the HBM tier needs at least {alignment} bytes, got {capacity}")
        self.device = device
        self._alloc = ExtentAllocator(capacity, alignment)
        self.arena = device.alloc(self._alloc.capacity)
        self._high, self._low = high_watermark, low_watermark
        self._reserve_dram, self._adopt_dram = reserve_dram, adopt_dram
        self._chunks: OrderedDict[bytes, _Extent] = OrderedDict()  # LRU first
        self._pins: set[bytes] = set()
        self._exports: dict[tuple[bytes, int], tuple[_Extent, int]] = {}  # -> (extent, exports live)
        self._lock = threading.RLock()
        self.counters: Counter[str] = Counter()
        self._closed = False

    # -- facts -------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._alloc.capacity

    @property
    def used(self) -> int:
        return self._alloc.used

    def __len__(self) -> int:
        return len(self._chunks)

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._chunks

    def size_of(self, key: bytes) -> int | None:
        with self._lock:
            ext = self._chunks.get(key)
            return ext.size if ext is not None else None

    def keys(self) -> list[bytes]:
        with self._lock:
            return list(self._chunks)

    # -- writes ------------------------------------------------------------------

    def put(self, key: bytes, src: DeviceBuffer | memoryview, *, pin: bool = False) -> None:
        """Copy ``src`` (CUDA or host memory) into the tier as ``key`` (replacing it),
        summing it on the device as it lands. NoSpace when nothing can make room."""
        n = len(src)
        if n <= 0:
            raise InvalidArgument("value is empty; kvstore stores chunks of at least one byte")
        if self._alloc.rounded(n) > self.capacity:
            raise InvalidArgument(f"value of {format_size(n)} exceeds the HBM tier ({format_size(self.capacity)})")
        seed = key_seed(key)
        with self._lock:
            self._check_open()
            off = self._room(n)
            dst = self.arena[off : off + n]
            try:
                self.device.after_callers()
                if isinstance(src, DeviceBuffer) and src.address % WORD == 0:
                    dsum = _summed(self.device, src, seed, dst)  # copied and summed in one kernel
                else:
                    if isinstance(src, DeviceBuffer):
                        self.device.copy(dst, src)
                    else:
                        self.device.to_device(dst, src)
                    dsum = _summed(self.device, dst, seed)
            except BaseException:
                self._alloc.free(off, n)
                raise
            self._supersede(key)  # (only now: a put that fails loses nothing)
            self._chunks[key] = _Extent(off, n, dsum)
            if pin:
                self._pins.add(key)
            self.counters["puts.hbm"] += 1

    def _supersede(self, key: bytes) -> None:
        old = self._chunks.pop(key, None)
        if old is not None:
            self._retire(old)
        self._pins.discard(key)

    def _retire(self, ext: _Extent) -> None:
        ext.live = False
        if ext.refs == 0:
            self._alloc.free(ext.offset, ext.size)

    def _room(self, n: int) -> int:
        """An extent for ``n`` bytes, demoting cold chunks first when use would pass the
        high watermark (down to the low one) or nothing fits."""
        need = self._alloc.rounded(n)
        if self.used + need > self._high * self.capacity:
            self._demote_until(self._low * self.capacity - need)
        off = self._alloc.alloc(n)
        while off is None:
            if not self._demote_one():
                raise NoSpace(f"no HBM room for {format_size(n)} (everything pinned or being read)")
            off = self._alloc.alloc(n)
        return off

    def _demote_until(self, target: float) -> None:
        while self.used > target and self._demote_one():
            pass

    def _demote_one(self) -> bool:
        victim = next((k for k, e in self._chunks.items() if k not in self._pins and e.refs == 0), None)
        if victim is None:
            return False
        ext = self._chunks.pop(victim)
        try:
            self._move_to_dram(victim, ext)
        finally:
            self._retire(ext)
        return True

    def _move_to_dram(self, key: bytes, ext: _Extent) -> None:
        src = self.arena[ext.offset : ext.offset + ext.size]
        if _summed(self.device, src, key_seed(key)) != ext.dsum:
            self._corrupt(key, "on demotion")
            return
        alloc = self._reserve_dram(ext.size) if self._reserve_dram is not None else None
        if alloc is None or self._adopt_dram is None:
            self.counters["hbm.dropped"] += 1
            log.info("HBM tier: dropped %d-byte chunk (no DRAM room to demote it to)", ext.size)
            return
        try:
            self.device.to_host(alloc.view(), src)
            self.device.wait()
            sums = block_sums(alloc.view(), key)
        except BaseException:
            alloc.release()
            raise
        self._adopt_dram(key, alloc, combine(sums, key), sums)
        self.counters["demotions.hbm"] += 1

    def _corrupt(self, key: bytes, when: str) -> None:
        self.counters["corrupt.hbm"] += 1
        log.warning("HBM tier: chunk %s failed its device sum %s; dropped", key[:16].hex(), when)

    # -- reads -------------------------------------------------------------------

    def get_into(self, key: bytes, dst: DeviceBuffer | memoryview) -> int | None:
        """Copy the value into ``dst`` (CUDA or host memory), verified on the device; its
        size, or None (absent or corrupt: a corrupt chunk is dropped)."""
        with self._lock:
            self._check_open()
            ext = self._chunks.get(key)
            if ext is None:
                return None
            if len(dst) < ext.size:
                raise InvalidArgument(f"buffer of {len(dst)} bytes is smaller than the value ({ext.size} bytes)")
            src = self.arena[ext.offset : ext.offset + ext.size]
            seed = key_seed(key)
            self.device.after_callers()
            if isinstance(dst, DeviceBuffer):
                ok = _copy_verified(self.device, src, dst, seed, ext.dsum)
            else:
                ok = _summed(self.device, src, seed) == ext.dsum  # verified before it leaves the GPU
                if ok:
                    self.device.to_host(dst[: ext.size], src)
                    self.device.wait()
            if not ok:
                self._drop_corrupt(key, ext)
                return None
            self._chunks.move_to_end(key)
            self.counters["hits.hbm"] += 1
            return ext.size

    def _drop_corrupt(self, key: bytes, ext: _Extent) -> None:
        self._corrupt(key, "on read")
        if self._chunks.get(key) is ext:
            del self._chunks[key]
            self._pins.discard(key)
            self._retire(ext)

    def view(self, key: bytes) -> Any | None:
        """A zero-copy, verified ``uint8`` device array over the chunk, or None. The bytes
        are not reused while the array (or a view of it) is alive; do not write to it."""
        with self._lock:
            self._check_open()
            ext = self._chunks.get(key)
            if ext is None:
                return None
            src = self.arena[ext.offset : ext.offset + ext.size]
            self.device.after_callers()
            if _summed(self.device, src, key_seed(key)) != ext.dsum:
                self._drop_corrupt(key, ext)
                return None
            ext.refs += 1
            self._chunks.move_to_end(key)
            self.counters["hits.hbm"] += 1
        held = DeviceBuffer(src.address, src.nbytes, src.device_id, _Hold(self, ext), readonly=True)
        return self.device.view(held)

    def export(self, key: bytes) -> DeviceChunk | None:
        """Hold the chunk for another process's :func:`read_exported`; None if absent.
        Pass the result to :meth:`release` when the reader is done (the bytes stay put
        until then)."""
        with self._lock:
            self._check_open()
            ext = self._chunks.get(key)
            if ext is None:
                return None
            ext.refs += 1
            held = self._exports.get((key, ext.offset))
            self._exports[(key, ext.offset)] = (ext, held[1] + 1 if held is not None else 1)
            return DeviceChunk(self.device.ipc_handle(self.arena), self.arena.nbytes, self.arena.device_id,
                               ext.offset, ext.size, ext.dsum, key)

    def release(self, chunk: DeviceChunk) -> None:
        """End an :meth:`export` (KeyError if no export of it is live)."""
        with self._lock:
            ext, count = self._exports.pop((chunk.key, chunk.offset))
            if count > 1:
                self._exports[(chunk.key, chunk.offset)] = (ext, count - 1)
            self._unhold(ext)

    def _unhold(self, ext: _Extent) -> None:
        with self._lock:
            ext.refs -= 1
            if ext.refs == 0 and not ext.live and not self._closed:
                self._alloc.free(ext.offset, ext.size)

    # -- bookkeeping -------------------------------------------------------------

    def remove(self, key: bytes) -> bool:
        with self._lock:
            ext = self._chunks.pop(key, None)
            self._pins.discard(key)
            if ext is None:
                return False
            self._retire(ext)
            return True

    def pin(self, key: bytes) -> bool:
        with self._lock:
            if key not in self._chunks:
                return False
            self._pins.add(key)
            return True

    def unpin(self, key: bytes) -> bool:
        with self._lock:
            if key not in self._pins:
                return False
            self._pins.discard(key)
            return True

    @property
    def pinned(self) -> int:
        return len(self._pins)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"medium": f"cuda:{self.arena.device_id}", "capacity": self.capacity, "used": self.used,
                    "chunks": len(self._chunks)}

    def _check_open(self) -> None:
        if self._closed:
            raise KVStoreError("the HBM tier is closed")

    def close(self) -> None:
        """Free the device arena (views and exports still alive keep nothing valid:
        close the store after its readers are done)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            held = sum(1 for e in self._chunks.values() if e.refs)
            if held:
                log.warning("HBM tier closed with %d chunks still viewed or exported", held)
            self._chunks.clear()
            self.device.free(self.arena)


class _Hold:
    """Owner of a device view: releases its extent once the view is collected."""

    __slots__ = ("tier", "ext", "__weakref__")

    def __init__(self, tier: HbmTier, ext: _Extent) -> None:
        self.tier, self.ext = tier, ext

    def __del__(self) -> None:
        self.tier._unhold(self.ext)


def read_exported(chunk: DeviceChunk, dst: DeviceBuffer, device: HbmDevice) -> bool:
    """In another process on the same host: copy an exported chunk device to device into
    ``dst`` (its first ``chunk.size`` bytes), verifying its device sum as it copies.
    False when it does not verify (``dst``'s content is then undefined)."""
    if len(dst) < chunk.size:
        raise InvalidArgument(f"buffer of {len(dst)} bytes is smaller than the chunk ({chunk.size} bytes)")
    peer = device.open_ipc(chunk.handle, chunk.arena_bytes)
    src = peer[chunk.offset : chunk.offset + chunk.size]
    device.after_callers()
    return _copy_verified(device, src, dst, key_seed(chunk.key), chunk.dsum)


def _summed(device: HbmDevice, src: DeviceBuffer, seed: int, dst: DeviceBuffer | None = None) -> int:
    """The device sum of ``src`` (copied into ``dst`` by the same kernel, when given),
    once everything queued on ``device`` has run."""
    device.sum(src, seed, dst)
    (acc,) = device.wait()
    return finish(acc, len(src), seed)


def _copy_verified(device: HbmDevice, src: DeviceBuffer, dst: DeviceBuffer, seed: int, dsum: int) -> bool:
    """Copy ``src`` into ``dst`` device to device, verified against ``dsum``: in one kernel
    when ``dst`` is 8-byte aligned (a mismatch leaves ``dst`` undefined), else summed
    first and copied only if it verified."""
    if dst.address % WORD == 0:
        return _summed(device, src, seed, dst[: len(src)]) == dsum
    if _summed(device, src, seed) != dsum:
        return False
    device.copy(dst[: len(src)], src)
    device.wait()
    return True
