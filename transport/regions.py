"""Registered memory regions, their remote descriptors and transfer descriptors.

A :class:`Region` is local memory a transport may read from or write into. The
caller owns the memory: it must outlive the registration and stay at the same
address; :meth:`Transport.deregister` is the point after which the transport
no longer touches it. A :class:`RemoteRegion` is the region's public face: a
small versioned binary blob the owner hands to peers (through whoever wires
the two sides) so they can name it in descriptors.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kvstore._types import byte_view
from kvstore.errors import InvalidArgument

__all__ = ["Desc", "Region", "RemoteRegion", "byte_view", "device_nbytes", "device_of"]

_REMOTE = struct.Struct("<4sBBHIQ")  # magic, version, kind, extra_len, region id, nbytes
_REMOTE_MAGIC = b"KVRR"
_REMOTE_VERSION = 1


@dataclass(eq=False)
class Region:
    """Local registered memory. Created by :meth:`Transport.register`.

    ``view`` is a flat writable byte view for host memory (``None`` for device
    memory, which only device-capable backends accept). ``obj`` is the object
    the caller registered, kept alive by the registration.
    """

    id: int
    nbytes: int
    view: memoryview | None
    obj: Any
    owner: int
    """``id()`` of the transport that registered it (descriptors are checked against it)."""
    name: str = ""
    device: str = "cpu"
    extra: bytes = b""
    """Backend data peers need (e.g. the pid and address for a CMA-exposed region)."""
    backend: Any = field(default=None, repr=False)
    """Backend-private state (a mapping, a memory handle); never used by core code."""

    def remote(self) -> RemoteRegion:
        """The descriptor to hand to peers (see :meth:`RemoteRegion.to_bytes`)."""
        return RemoteRegion(self.id, self.nbytes, self.extra)


@dataclass(frozen=True)
class RemoteRegion:
    """A peer's region as named in descriptors. Opaque outside the transport."""

    region_id: int
    nbytes: int
    extra: bytes = b""

    def to_bytes(self) -> bytes:
        return (
            _REMOTE.pack(
                _REMOTE_MAGIC, _REMOTE_VERSION, 0, len(self.extra), self.region_id, self.nbytes
            )
            + self.extra
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RemoteRegion:
        """Parse a descriptor; raises :class:`InvalidArgument` when malformed."""
        if len(data) < _REMOTE.size:
            raise InvalidArgument(f"remote region descriptor too short ({len(data)} B)")
        magic, ver, _kind, n_extra, rid, nbytes = _REMOTE.unpack_from(data)
        if magic != _REMOTE_MAGIC or ver != _REMOTE_VERSION:
            raise InvalidArgument(f"not a v{_REMOTE_VERSION} remote region descriptor")
        if len(data) != _REMOTE.size + n_extra:
            raise InvalidArgument("remote region descriptor has a bad length")
        return cls(rid, nbytes, bytes(data[_REMOTE.size :]))


class Desc(NamedTuple):
    """One range of a batch: ``length`` bytes between local and remote offsets."""

    local: Region
    local_offset: int
    remote: RemoteRegion
    remote_offset: int
    length: int


def device_of(buf: Any) -> str:
    """``"cuda"`` for objects exporting ``__cuda_array_interface__`` (CuPy, torch), else ``"cpu"``."""
    if hasattr(buf, "__cuda_array_interface__"):
        return "cuda"
    dev = getattr(buf, "device", None)  # torch tensors on CUDA
    if dev is not None and getattr(dev, "type", "cpu") == "cuda":
        return "cuda"
    return "cpu"


def device_nbytes(buf: Any) -> int:
    """Size of a device buffer from its CUDA array interface (or torch's nbytes)."""
    nbytes = getattr(buf, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    iface = buf.__cuda_array_interface__
    n = 1
    for s in iface["shape"]:
        n *= int(s)
    import numpy as np  # noqa: PLC0415

    return n * int(np.dtype(iface["typestr"]).itemsize)
