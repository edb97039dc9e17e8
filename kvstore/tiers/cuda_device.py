"""The HBM tier's GPU work through CuPy: the device arena (one ``cudaMalloc``), copies
(``cudaMemcpyAsync``), the device-sum kernels of ``csrc/cuda/device_sum.cu`` (NVRTC,
compiled once per device) and CUDA IPC handles. Imported only when an HBM tier is
configured or an exported chunk is read, so CPU-only installs never load CUDA.

Everything runs on one non-blocking stream of the device; :meth:`after_callers`
orders it after the work the caller queued on CuPy's and torch's current streams,
and :meth:`wait` synchronizes it (the tier's calls are blocking).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from kvstore.checksum import address_of
from kvstore.devmem import DeviceBuffer
from kvstore.errors import InvalidArgument, KVStoreError
from kvstore.kernels.cuda import cupy, module, sm_count

THREADS = 256
_BLOCKS_PER_SM = 8
_HOST_TO_DEVICE, _DEVICE_TO_HOST, _DEVICE_TO_DEVICE = 1, 2, 3
_IPC_LAZY_ENABLE_PEER_ACCESS = 1


class CudaHbmDevice:
    """:class:`~kvstore.tiers.hbm.HbmDevice` on CUDA device ``device_id``."""

    def __init__(self, device_id: int = 0) -> None:
        cp = self._cp = cupy()
        self._rt = cp.cuda.runtime
        count = self._rt.getDeviceCount()
        if not 0 <= device_id < count:
            raise InvalidArgument(f"CUDA device {device_id} does not exist ({count} visible)")
        self.device_id = device_id
        with cp.cuda.Device(device_id):
            self._stream = cp.cuda.Stream(non_blocking=True)
            mod = module(device_id, "device_sum.cu")
            self._dsum, self._dsum_copy = mod.get_function("kvs_dsum"), mod.get_function("kvs_dsum_copy")
            self._slots = cp.zeros(64, dtype=cp.uint64)
            self._host_slots = self._pinned_slots(64)
            self._sms = sm_count(cp, device_id)
        self._pending = 0  # sums queued since the last wait
        self._mine: dict[int, Any] = {}  # address -> cupy Memory
        self._opened: dict[bytes, int] = {}  # IPC handle -> address in this process

    def _pinned_slots(self, n: int) -> np.ndarray:
        mem = self._cp.cuda.alloc_pinned_memory(8 * n)
        return np.frombuffer(mem, dtype=np.uint64, count=n)

    def _ctx(self) -> Any:
        return self._cp.cuda.Device(self.device_id)

    def alloc(self, nbytes: int) -> DeviceBuffer:
        with self._ctx():
            try:
                mem = self._cp.cuda.Memory(nbytes)  # cudaMalloc of its own: IPC-exportable at offset 0
            except self._cp.cuda.memory.OutOfMemoryError as e:
                raise KVStoreError(f"cuda:{self.device_id} cannot hold an HBM tier of {nbytes} bytes: {e}") from e
        self._mine[int(mem.ptr)] = mem
        return DeviceBuffer(int(mem.ptr), nbytes, self.device_id, mem)

    def free(self, buf: DeviceBuffer) -> None:
        self._mine.pop(buf.address, None)  # cudaFree when the last reference goes

    def to_device(self, dst: DeviceBuffer, src: memoryview) -> None:
        if len(src):
            with self._ctx():
                self._rt.memcpyAsync(dst.address, address_of(src), len(src), _HOST_TO_DEVICE, self._stream.ptr)

    def to_host(self, dst: memoryview, src: DeviceBuffer) -> None:
        if len(src):
            with self._ctx():
                self._rt.memcpyAsync(address_of(dst), src.address, len(src), _DEVICE_TO_HOST, self._stream.ptr)

    def copy(self, dst: DeviceBuffer, src: DeviceBuffer) -> None:
        if len(src):
            with self._ctx():
                self._rt.memcpyAsync(dst.address, src.address, len(src), _DEVICE_TO_DEVICE, self._stream.ptr)

    def sum(self, src: DeviceBuffer, seed: int, dst: DeviceBuffer | None = None) -> None:
        cp = self._cp
        with self._ctx():
            if self._pending == len(self._slots):
                grown = cp.zeros(2 * len(self._slots), dtype=cp.uint64)
                with self._stream:
                    grown[: len(self._slots)] = self._slots
                self._slots = grown
                self._host_slots = self._pinned_slots(len(grown))
            slot = int(self._slots.data.ptr) + 8 * self._pending
            self._rt.memsetAsync(slot, 0, 8, self._stream.ptr)
            words = max(1, len(src) // 8)
            blocks = max(1, min(_BLOCKS_PER_SM * self._sms, -(-words // (2 * THREADS))))
            with self._stream:
                if dst is None:
                    self._dsum((blocks,), (THREADS,), (np.uint64(src.address), np.uint64(len(src)),
                                                       np.uint64(seed), np.uint64(slot)))
                else:
                    self._dsum_copy((blocks,), (THREADS,), (np.uint64(src.address), np.uint64(dst.address),
                                                            np.uint64(len(src)), np.uint64(seed),
                                                            np.uint64(slot)))
            self._pending += 1

    def after_callers(self) -> None:
        cp = self._cp
        with self._ctx():
            streams = [cp.cuda.get_current_stream()]
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_initialized():
                streams.append(cp.cuda.ExternalStream(torch.cuda.current_stream(self.device_id).cuda_stream))
            for s in streams:
                if s.ptr != self._stream.ptr:
                    self._stream.wait_event(s.record())

    def wait(self) -> list[int]:
        try:
            with self._ctx():
                n, self._pending = self._pending, 0
                if n:  # the totals come back on the stream itself: one synchronization per call
                    self._rt.memcpyAsync(int(self._host_slots.ctypes.data), int(self._slots.data.ptr), 8 * n,
                                         _DEVICE_TO_HOST, self._stream.ptr)
                self._stream.synchronize()
                return [int(v) for v in self._host_slots[:n]]
        except self._rt.CUDARuntimeError as e:
            self._pending = 0
            raise KVStoreError(f"HBM tier: CUDA work failed: {e}") from e

    def view(self, buf: DeviceBuffer) -> Any:
        cp = self._cp
        mem = cp.cuda.UnownedMemory(buf.address, buf.nbytes, buf, self.device_id)
        return cp.ndarray((buf.nbytes,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(mem, 0))

    def ipc_handle(self, buf: DeviceBuffer) -> bytes:
        if buf.address not in self._mine:
            raise InvalidArgument("only the arena this device allocated has an IPC handle")
        with self._ctx():
            return bytes(self._rt.ipcGetMemHandle(buf.address))

    def open_ipc(self, handle: bytes, nbytes: int) -> DeviceBuffer:
        addr = self._opened.get(handle)
        if addr is None:
            with self._ctx():
                addr = self._opened[handle] = int(self._rt.ipcOpenMemHandle(handle, _IPC_LAZY_ENABLE_PEER_ACCESS))
        return DeviceBuffer(addr, nbytes, self.device_id, self)

    def close_ipc(self) -> None:
        """Close the handles this process opened (their owners' memory stays)."""
        with self._ctx():
            for addr in self._opened.values():
                self._rt.ipcCloseMemHandle(addr)
        self._opened.clear()
