"""Describe arrays and buffers without importing their frameworks.

NumPy arrays, anything with the buffer protocol, torch tensors (CPU or CUDA)
and CuPy arrays are read through duck typing (``data_ptr``/``stride``,
``__cuda_array_interface__``, ``__array_interface__``), so importing this module
never imports torch or CuPy. A description holds a reference to the object it
describes (``owner``): the memory stays valid while the description lives.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from kvstore.errors import InvalidArgument

Device = Literal["cpu", "cuda"]


@dataclass(frozen=True)
class ArrayInfo:
    """Address, shape and byte strides of one array (immutable)."""

    address: int
    """Address of element ``[0, 0, ...]``."""
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    """Bytes between neighbours along each axis (may be negative for NumPy)."""
    itemsize: int
    dtype: str
    """Element type name: NumPy/torch spelling without a ``torch.`` prefix."""
    device: Device
    device_id: int
    readonly: bool
    owner: Any
    """The described object, kept alive by this description."""

    def span(self) -> tuple[int, int]:
        """``(lo, hi)``: byte offsets from :attr:`address` bounding every element."""
        lo = hi = 0
        for n, s in zip(self.shape, self.strides, strict=True):
            if n == 0:
                return 0, 0
            if s < 0:
                lo += (n - 1) * s
            else:
                hi += (n - 1) * s
        return lo, hi + self.itemsize

    @property
    def contiguous(self) -> bool:
        expect = self.itemsize
        for n, s in zip(reversed(self.shape), reversed(self.strides), strict=True):
            if n != 1 and s != expect:
                return False
            expect *= n
        return True

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


def describe(obj: Any) -> ArrayInfo:
    """Describe a torch tensor, CuPy array, NumPy array or buffer-protocol object.

    Raises :class:`InvalidArgument` for anything else. Never copies.
    """
    if callable(getattr(obj, "data_ptr", None)) and callable(getattr(obj, "stride", None)):
        return _torch(obj)
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        return _cuda_interface(obj, cai)
    try:
        arr = obj if isinstance(obj, np.ndarray) else np.frombuffer(memoryview(obj), np.uint8)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"cannot read memory of {type(obj).__name__}: {e}") from e
    return ArrayInfo(
        address=int(arr.__array_interface__["data"][0]),
        shape=tuple(int(n) for n in arr.shape),
        strides=tuple(int(s) for s in arr.strides),
        itemsize=int(arr.itemsize),
        dtype=_dtype_name(arr.dtype),
        device="cpu",
        device_id=0,
        readonly=not arr.flags.writeable,
        owner=arr,
    )


_NAMES: dict[np.dtype[Any], str] = {}


def _dtype_name(dt: np.dtype[Any]) -> str:
    # np.dtype.name runs Python code (~10 us); the hot path sees a handful of dtypes.
    name = _NAMES.get(dt)
    if name is None:
        name = _NAMES[dt] = dt.name
    return name


def _torch(t: Any) -> ArrayInfo:
    itemsize = int(t.element_size())
    dev = t.device
    return ArrayInfo(
        address=int(t.data_ptr()),
        shape=tuple(int(n) for n in t.shape),
        strides=tuple(int(s) * itemsize for s in t.stride()),
        itemsize=itemsize,
        dtype=str(t.dtype).removeprefix("torch."),
        device="cuda" if dev.type == "cuda" else "cpu",
        device_id=int(dev.index or 0),
        readonly=False,
        owner=t,
    )


def _cuda_interface(obj: Any, cai: dict[str, Any]) -> ArrayInfo:
    dt = np.dtype(cai["typestr"])
    shape = tuple(int(n) for n in cai["shape"])
    strides = cai.get("strides")
    if strides is None:
        acc, out = dt.itemsize, []
        for n in reversed(shape):
            out.append(acc)
            acc *= n
        strides = tuple(reversed(out))
    ptr, readonly = cai["data"]
    dev = getattr(obj, "device", None)
    return ArrayInfo(
        address=int(ptr),
        shape=shape,
        strides=tuple(int(s) for s in strides),
        itemsize=dt.itemsize,
        dtype=dt.name,
        device="cuda",
        device_id=int(getattr(dev, "id", 0) or 0),
        readonly=bool(readonly),
        owner=obj,
    )


def byte_buffer(obj: Any, *, writable: bool, what: str) -> ArrayInfo:
    """Describe a contiguous chunk buffer; ``writable`` demands write access."""
    info = describe(obj)
    if not info.contiguous:
        raise InvalidArgument(f"{what}: buffer must be contiguous (shape {info.shape}, strides {info.strides})")
    if writable and info.readonly:
        raise InvalidArgument(f"{what}: buffer is read-only")
    return info


def host_bytes(address: int, nbytes: int) -> np.ndarray:
    """Writable uint8 array over ``nbytes`` of host memory at ``address`` (no copy).

    The caller guarantees the memory stays mapped while the array is used.
    """
    raw = (ctypes.c_uint8 * nbytes).from_address(address)
    return np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8)
