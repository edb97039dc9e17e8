"""The tier interface: one storage medium holding checksummed chunks.

A tier stores bytes under keys and verifies them on every read; it makes **no
policy decisions** (what to evict, where to put things): the
:class:`~kvstore.tiers.manager.TierManager` does that. Contract:

``put(key, data, checksum)``
    Store ``data`` (any buffer) under ``key``; the entry is visible only once the
    call returns (and, for persistent tiers, once it is durable). Replaces an
    existing entry atomically. Raises :class:`NoSpace` when no room is free;
    never evicts by itself. Blocking.
``read_into(key, dst)``
    Copy the entry into ``dst`` (exactly its size) and verify the checksum of
    what landed. Raises :class:`NotFound`, or :class:`Corruption` after dropping
    the entry. Blocking; ``dst`` stays owned by the caller.
``view(key)``
    Zero-copy read-only view (capability ``zero_copy``) valid for as long as the
    returned object lives; verified. Tiers without the capability return ``None``.
``put_padded(key, data, size, checksum)``
    ``put`` of the first ``size`` bytes of ``data`` (an arena extent's full view may
    be written as is).
``remove(key)``, ``contains(key)``, ``entry(key)``, ``keys()``
    Metadata; never touch data.
``fits(nbytes)``
    Whether a ``put`` of ``nbytes`` would find room right now.

Tiers are thread-safe for concurrent reads and single-writer metadata; the
manager serializes writes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kvstore._types import Buffer


@dataclass(frozen=True)
class TierCapabilities:
    """What a tier can do; callers branch on these, never on the tier's type."""

    persistent: bool
    """Entries survive a process restart."""
    zero_copy: bool
    """``view()`` returns the stored bytes without copying."""
    medium: str
    """``"dram"``, ``"hbm"`` or ``"disk"``: for metrics and placement."""


@dataclass(frozen=True)
class Entry:
    """What a tier knows about one stored chunk."""

    size: int
    checksum: int


class Tier(ABC):
    """Abstract tier; see the module docstring for the contract."""

    name: str
    capabilities: TierCapabilities

    @property
    @abstractmethod
    def capacity(self) -> int:
        """Usable bytes."""

    @property
    @abstractmethod
    def used(self) -> int:
        """Bytes taken (allocation granularity included)."""

    @abstractmethod
    def charge(self, nbytes: int) -> int:
        """Bytes a chunk of ``nbytes`` takes in this tier."""

    @abstractmethod
    def fits(self, nbytes: int) -> bool: ...

    @abstractmethod
    def put(self, key: bytes, data: Buffer, checksum: int | None = None) -> int:
        """Store ``data``; returns its checksum (computed while copying when not given)."""

    def put_padded(self, key: bytes, data: memoryview, size: int, checksum: int | None) -> int:
        """Store the first ``size`` bytes of ``data`` (which may be longer: an arena
        extent's full, aligned view, that a tier can write without a bounce copy)."""
        return self.put(key, data[:size], checksum)

    @abstractmethod
    def read_into(self, key: bytes, dst: memoryview) -> None: ...

    def view(self, key: bytes) -> np.ndarray | None:
        return None

    @abstractmethod
    def remove(self, key: bytes) -> bool: ...

    @abstractmethod
    def entry(self, key: bytes) -> Entry | None: ...

    def contains(self, key: bytes) -> bool:
        return self.entry(key) is not None

    @abstractmethod
    def keys(self) -> Iterator[bytes]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def close(self) -> None: ...
