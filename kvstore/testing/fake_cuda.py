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
from kvstore.client.device import DeviceBuffer


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
