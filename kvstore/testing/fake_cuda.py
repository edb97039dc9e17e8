"""Host memory that poses as CUDA memory, for tests of the client's device paths on
machines without a GPU (unit tests only; the real path is kvstore.client.device.CudaCopier,
tested on a GPU by tests marked ``gpu`` and benchmarks/gpu_check.py).

:class:`FakeCudaArray` exposes ``__cuda_array_interface__`` over a NumPy buffer, so
the client takes it for device memory; :class:`HostCopier` stands in for the CUDA
copier (plain memmoves) and records what it was asked to do, so a test can tell a
DMA straight out of a node's arena from one out of a staging buffer.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from kvstore.checksum import address_of
from kvstore.devmem import DeviceBuffer


class FakeCudaArray:
    """``nbytes`` bytes of "device" memory (really host memory), filled with ``fill``."""

    def __init__(self, nbytes: int, fill: int = 0, *, readonly: bool = False) -> None:
        self.host = np.full(nbytes, fill, dtype=np.uint8)
        self._readonly = readonly

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (len(self.host),), "typestr": "|u1", "version": 3, "strides": None,
                "data": (int(self.host.ctypes.data), self._readonly)}

    def tobytes(self) -> bytes:
        return self.host.tobytes()



class HostCopier:
    """The :class:`~kvstore.client.device.Copier` contract with memmoves. Records the host
    ranges registered, the host addresses each copy read or wrote, and the staging
    buffers handed out."""

    def __init__(self) -> None:
        self.registered: list[tuple[int, int]] = []
        self.to_device_from: list[tuple[int, int]] = []  # (host address, bytes)
        self.to_host_into: list[tuple[int, int]] = []
        self.staged = 0
        self.waits = 0
        self._queued: list[tuple[int, int, int]] = []  # (dst, src, n): moved at wait(), as DMA lands late

    def register(self, host: memoryview) -> None:
        self.registered.append((address_of(host), len(host)))

    def to_device(self, dst: DeviceBuffer, src: memoryview) -> None:
        assert len(src) <= len(dst)
        self.to_device_from.append((address_of(src), len(src)))
        self._queued.append((dst.address, address_of(src), len(src)))

    def to_host(self, dst: memoryview, src: DeviceBuffer) -> None:
        assert len(src) <= len(dst) and not dst.readonly
        self.to_host_into.append((address_of(dst), len(src)))
        self._queued.append((address_of(dst), src.address, len(src)))

    def wait(self) -> None:
        self.waits += 1
        queued, self._queued = self._queued, []
        for dst, src, n in queued:
            ctypes.memmove(dst, src, n)

    def staging(self, nbytes: int) -> memoryview:
        self.staged += 1
        return memoryview(bytearray(nbytes))

    def within(self, address: int, view: memoryview) -> bool:
        """Whether ``address`` lies in ``view`` (an arena mapping, say)."""
        lo = address_of(view)
        return lo <= address < lo + len(view)


class FakeDeviceView:
    """What :meth:`HostHbmDevice.view` returns: ``__cuda_array_interface__`` over the
    bytes in place (no copy), keeping the tier's hold alive."""

    def __init__(self, buf: DeviceBuffer) -> None:
        self.buf = buf

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (self.buf.nbytes,), "typestr": "|u1", "version": 3, "strides": None,
                "data": (self.buf.address, True)}

    def __len__(self) -> int:
        return self.buf.nbytes

    def tobytes(self) -> bytes:
        return ctypes.string_at(self.buf.address, self.buf.nbytes)


class HostHbmDevice:
    """The :class:`~kvstore.tiers.hbm.HbmDevice` contract on host memory, for tests of the
    HBM tier without a GPU. The "device arena" is a POSIX shared-memory segment, so its
    "IPC handle" (the segment's name) opens in another process as a CUDA IPC handle
    would. Work is queued and runs, in order, at :meth:`wait` (as a stream runs late);
    the device sum is :mod:`kvstore.device_sum`'s reference, and a copying sum insists
    on the 8-byte alignment the kernel needs. ``ops`` records what was queued."""

    def __init__(self, device_id: int = 0) -> None:
        self.device_id = device_id
        self.ops: list[tuple[str, int]] = []  # (kind, bytes)
        self.waits = 0
        self._queue: list[Any] = []
        self._mine: dict[int, tuple[Any, np.ndarray]] = {}  # address -> (segment, array over it)
        self._opened: dict[bytes, tuple[Any, np.ndarray]] = {}

    def _segment(self, shm: Any) -> tuple[Any, np.ndarray]:
        return shm, np.frombuffer(shm.buf, dtype=np.uint8)

    def alloc(self, nbytes: int) -> DeviceBuffer:
        from multiprocessing import shared_memory

        shm, arr = self._segment(shared_memory.SharedMemory(create=True, size=nbytes))
        addr = int(arr.ctypes.data)
        self._mine[addr] = (shm, arr)
        return DeviceBuffer(addr, nbytes, self.device_id, self)

    def free(self, buf: DeviceBuffer) -> None:
        shm, arr = self._mine.pop(buf.address)
        del arr
        shm.close()
        shm.unlink()

    def to_device(self, dst: DeviceBuffer, src: memoryview) -> None:
        self._queue.append(("move", dst.address, address_of(src), len(src)))
        self.ops.append(("h2d", len(src)))

    def to_host(self, dst: memoryview, src: DeviceBuffer) -> None:
        assert not dst.readonly and len(dst) >= len(src)
        self._queue.append(("move", address_of(dst), src.address, len(src)))
        self.ops.append(("d2h", len(src)))

    def copy(self, dst: DeviceBuffer, src: DeviceBuffer) -> None:
        assert len(dst) >= len(src)
        self._queue.append(("move", dst.address, src.address, len(src)))
        self.ops.append(("d2d", len(src)))

    def sum(self, src: DeviceBuffer, seed: int, dst: DeviceBuffer | None = None) -> None:
        if dst is not None:
            assert src.address % 8 == 0 and dst.address % 8 == 0, "the copying sum kernel wants 8-byte alignment"
            assert len(dst) >= len(src)
            self._queue.append(("move", dst.address, src.address, len(src)))
        self._queue.append(("sum", src.address, len(src), seed))
        self.ops.append(("sum_copy" if dst is not None else "sum", len(src)))

    def after_callers(self) -> None:
        pass

    def wait(self) -> list[int]:
        from kvstore.device_sum import total

        self.waits += 1
        queued, self._queue = self._queue, []
        out = []
        for op in queued:
            if op[0] == "move":
                ctypes.memmove(op[1], op[2], op[3])
            else:
                out.append(total(ctypes.string_at(op[1], op[2]), op[3]))
        return out

    def view(self, buf: DeviceBuffer) -> FakeDeviceView:
        return FakeDeviceView(buf)

    def ipc_handle(self, buf: DeviceBuffer) -> bytes:
        shm, _ = self._mine[buf.address]
        return str(shm.name).encode()

    def open_ipc(self, handle: bytes, nbytes: int) -> DeviceBuffer:
        got = self._opened.get(handle)
        if got is None:
            from multiprocessing import resource_tracker, shared_memory

            shm = shared_memory.SharedMemory(name=handle.decode())
            # the owner unlinks it; this process only maps it (Python < 3.13 would unlink at exit)
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
            got = self._opened[handle] = self._segment(shm)
        return DeviceBuffer(int(got[1].ctypes.data), nbytes, self.device_id, got[0])

    def poke(self, address: int, data: bytes) -> None:
        """Overwrite device bytes (a test's bit flip)."""
        ctypes.memmove(address, data, len(data))
