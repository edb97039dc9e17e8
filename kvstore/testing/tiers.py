"""A tier wrapper for tests: holds reads and/or writes of the tier it wraps until released.

``GatedTier(inner)`` forwards every call to ``inner``; while ``reads`` (or
``writes``) is closed, ``read_into`` (``put``/``put_padded``) calls wait on it,
so a test can hold a disk I/O in flight and check what else proceeds meanwhile.
``entered`` is set once a gated call is waiting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from kvstore._types import Buffer
from kvstore.tiers.base import Entry, Tier


class Gate:
    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self.entered = threading.Event()

    def close(self) -> None:
        self._open.clear()
        self.entered.clear()

    def open(self) -> None:
        self._open.set()

    def pass_(self, timeout: float = 30.0) -> None:
        if not self._open.is_set():
            self.entered.set()
            if not self._open.wait(timeout):
                raise TimeoutError("gate stayed closed")


class GatedTier(Tier):
    def __init__(self, inner: Tier) -> None:
        self.inner = inner
        self.name = inner.name
        self.capabilities = inner.capabilities
        self.reads = Gate()
        self.writes = Gate()

    @property
    def capacity(self) -> int:
        return self.inner.capacity

    @property
    def used(self) -> int:
        return self.inner.used

    def charge(self, nbytes: int) -> int:
        return self.inner.charge(nbytes)

    def fits(self, nbytes: int) -> bool:
        return self.inner.fits(nbytes)

    def put(self, key: bytes, data: Buffer, checksum: int | None = None) -> int:
        self.writes.pass_()
        return self.inner.put(key, data, checksum)

    def put_padded(self, key: bytes, data: memoryview, size: int, checksum: int | None) -> int:
        self.writes.pass_()
        return self.inner.put_padded(key, data, size, checksum)

    def read_into(self, key: bytes, dst: memoryview) -> None:
        self.reads.pass_()
        self.inner.read_into(key, dst)

    def remove(self, key: bytes) -> bool:
        return self.inner.remove(key)

    def entry(self, key: bytes) -> Entry | None:
        return self.inner.entry(key)

    def keys(self) -> Iterator[bytes]:
        return self.inner.keys()

    def __len__(self) -> int:
        return len(self.inner)

    def close(self) -> None:
        self.inner.close()

    @property
    def corrupt_on_open(self) -> int:
        return int(getattr(self.inner, "corrupt_on_open", 0))
