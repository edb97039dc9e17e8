"""CUDA buffers in the SDK: ``get_into``/``put_from`` and their batches take CUDA tensors
and CuPy arrays (anything with ``__cuda_array_interface__``, or a torch CUDA tensor).

How the bytes move (docs/gpu.md):

* **Same host.** The client maps the node's DRAM arena (shared memory) anyway; for a
  device buffer it page-locks that mapping once (``cudaHostRegister``) and DMAs
  straight between the pool's memory and the GPU (``cudaMemcpyAsync`` on a stream of
  its own): no staging copy, no pageable memory. A read verifies the value in the
  arena first (the key-seeded XXH3 of the source, or of every block the ranges
  touch) and checks the extent generation again after the DMA, as a one-sided host
  read does; a write DMAs the value into its extent and hashes it there before
  ``COMMIT``, so the checksum is that of the bytes in the pool.
* **Other hosts.** The bytes pass through a pinned staging buffer of the client
  (``cudaHostAlloc``, reused): a FETCH lands and verifies there before the copy to
  the device; a STORE sends from there after the copy from the device.

Either way a device buffer receives bytes only after they verified, and a miss
leaves its content undefined (as for host buffers). Copies are synchronous for the
caller: the call returns once the bytes are where they belong.

The :class:`Copier` does the CUDA part. :class:`CudaCopier` is the real one (CuPy;
imported only when a device buffer is first seen, so CPU-only installs never load
CUDA). Tests on machines without a GPU use :class:`kvstore.testing.fake_cuda.HostCopier`,
which moves host memory that poses as device memory, to run the same client logic.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import numpy as np

from kvstore.checksum import address_of
from kvstore.devmem import DeviceBuffer, device_buffer
from kvstore.errors import InvalidArgument, KVStoreError

__all__ = ["Copier", "CudaCopier", "DeviceBuffer", "cuda_copier", "device_buffer"]


class Copier(Protocol):
    """Moves bytes between host memory and CUDA memory for a client."""

    def register(self, host: memoryview) -> None:
        """Page-lock ``host`` (a mapped arena) for DMA; once per mapping, idempotent."""

    def to_device(self, dst: DeviceBuffer, src: memoryview) -> None:
        """Queue a copy of ``src`` into ``dst[:len(src)]``."""

    def to_host(self, dst: memoryview, src: DeviceBuffer) -> None:
        """Queue a copy of ``src`` into ``dst[:len(src)]``."""

    def wait(self) -> None:
        """Return once every queued copy has landed (raises KVStoreError if one failed)."""

    def staging(self, nbytes: int) -> memoryview:
        """A pinned host buffer of ``nbytes`` of its own, for bytes on their way to or
        from the GPU (freed when the view is dropped)."""


# CUDA runtime enum values (cudaHostRegisterPortable, cudaMemcpyHostToDevice/DeviceToHost)
_HOST_REGISTER_PORTABLE = 1
_HOST_TO_DEVICE = 1
_DEVICE_TO_HOST = 2



class CudaCopier:
    """:class:`Copier` over CuPy's CUDA runtime bindings: ``cudaHostRegister`` for mapped
    arenas, ``cudaMemcpyAsync`` on one non-blocking stream per device, staging buffers
    from CuPy's pinned memory pool (``cudaHostAlloc``). Thread-safe."""

    def __init__(self) -> None:
        try:
            import cupy
        except ImportError as e:
            raise KVStoreError(f"a CUDA buffer was given but CuPy is missing ({e}); pip install 'kvstore[gpu]'") from e
        self._cp = cupy
        self._rt = cupy.cuda.runtime
        self._streams: dict[int, Any] = {}
        self._registered: dict[int, int] = {}  # host address -> bytes page-locked there
        self._lock = threading.Lock()

    def _stream(self, device_id: int) -> Any:
        s = self._streams.get(device_id)
        if s is None:
            with self._lock, self._cp.cuda.Device(device_id):
                s = self._streams.get(device_id)
                if s is None:
                    s = self._streams[device_id] = self._cp.cuda.Stream(non_blocking=True)
        return s

    def register(self, host: memoryview) -> None:
        addr = address_of(host)
        with self._lock:
            if self._registered.get(addr, 0) >= len(host):
                return
            # portable: every device (and context) may DMA from it
            self._rt.hostRegister(addr, len(host), _HOST_REGISTER_PORTABLE)
            self._registered[addr] = len(host)

    def to_device(self, dst: DeviceBuffer, src: memoryview) -> None:
        if len(src) > len(dst):
            raise InvalidArgument(f"{len(src)} bytes do not fit a device buffer of {len(dst)}")
        if len(src):
            with self._cp.cuda.Device(dst.device_id):
                self._rt.memcpyAsync(dst.address, address_of(src), len(src), _HOST_TO_DEVICE,
                                     self._stream(dst.device_id).ptr)

    def to_host(self, dst: memoryview, src: DeviceBuffer) -> None:
        if len(src) > len(dst):
            raise InvalidArgument(f"a device buffer of {len(src)} bytes does not fit {len(dst)}")
        if len(src):
            with self._cp.cuda.Device(src.device_id):
                self._rt.memcpyAsync(address_of(dst), src.address, len(src), _DEVICE_TO_HOST,
                                     self._stream(src.device_id).ptr)

    def wait(self) -> None:
        try:
            for s in self._streams.values():
                s.synchronize()
        except self._rt.CUDARuntimeError as e:
            raise KVStoreError(f"CUDA copy failed: {e}") from e

    def staging(self, nbytes: int) -> memoryview:
        # CuPy's pinned memory pool hands freed blocks out again: after the first calls
        # this costs no cudaHostAlloc. The array keeps the block alive, the view the array.
        mem = self._cp.cuda.alloc_pinned_memory(max(nbytes, 1))
        return np.frombuffer(mem, dtype=np.uint8, count=max(nbytes, 1)).data[:nbytes]


def cuda_copier() -> Copier:
    """The CUDA copier (CuPy); KVStoreError if CuPy is not installed."""
    return CudaCopier()
