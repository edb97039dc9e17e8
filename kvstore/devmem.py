"""CUDA memory as kvstore sees it: a :class:`DeviceBuffer` (address, size, device,
owner) made from a torch CUDA tensor, a CuPy array or anything with
``__cuda_array_interface__``. Pure Python: nothing here loads CUDA."""

from __future__ import annotations

from typing import Any

import numpy as np

from kvstore.errors import InvalidArgument
from kvstore.kernels.arrays import describe


class DeviceBuffer:
    """``nbytes`` of CUDA memory at ``address`` on ``device_id`` (contiguous), and the
    object that owns them (kept alive). Slicing (step 1) gives a sub-range."""

    readonly: bool

    def __init__(self, address: int, nbytes: int, device_id: int, owner: Any, *, readonly: bool = False) -> None:
        self.address, self.nbytes, self.device_id, self.owner = address, nbytes, device_id, owner
        self.readonly = readonly

    def __len__(self) -> int:
        return self.nbytes

    def __getitem__(self, sl: slice) -> DeviceBuffer:
        start, stop, step = sl.indices(self.nbytes)
        if step != 1:
            raise InvalidArgument("a device buffer slices with step 1 only")
        return DeviceBuffer(self.address + start, max(stop - start, 0), self.device_id, self.owner,
                            readonly=self.readonly)

    def __repr__(self) -> str:
        return f"DeviceBuffer(cuda:{self.device_id}, {self.nbytes} B at {self.address:#x})"


def device_buffer(obj: Any, what: str = "buffer") -> DeviceBuffer | None:
    """``obj`` as a :class:`DeviceBuffer` if it is CUDA memory, else None (host memory is
    taken as it always was). InvalidArgument for CUDA memory that is not contiguous."""
    if isinstance(obj, (bytes, bytearray, memoryview, np.ndarray)):
        return None
    if not getattr(obj, "is_cuda", False) and getattr(obj, "__cuda_array_interface__", None) is None:
        return None  # (a CPU torch tensor raises AttributeError there, which getattr absorbs)
    info = describe(obj)
    if info.device != "cuda":
        return None
    if not info.contiguous:
        raise InvalidArgument(f"{what}: CUDA memory must be contiguous (shape {info.shape}, strides {info.strides})")
    return DeviceBuffer(info.address, info.nbytes, info.device_id, obj, readonly=info.readonly)
