"""The client's cache of where keys live, so reads skip the master's Lookup.

Keys are immutable while they exist (a put of an existing key changes nothing),
so a remembered location stays right until the key leaves that node. A cached
read goes to the remembered node directly: same host, one-sided out of the
mapped arena if the extent generation still matches (kvstore.client.samehost);
otherwise through ACQUIRE, where the node's size and checksum must equal the
cached ones. Either way the bytes must verify, and any mismatch forgets the
entry and falls back to a Lookup. A removal through :meth:`Client.remove` is
sent to the holding nodes at once, which bumps the extent generation, so no
cached location serves a removed key. Thread-safe, bounded (least recently used
entries go first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from kvstore.v1 import master_pb2 as mpb


@dataclass(frozen=True)
class Known:
    node: mpb.NodeInfo
    size: int
    checksum: int
    offset: int = -1
    """Offset in the node's arena (``-1``: unknown, or not in DRAM)."""
    generation: int = 0
    """Extent generation at ``offset`` when the location was learned."""
    sums: np.ndarray | None = None
    """Block sums (kvstore.checksum), needed to verify a partial read; ``None``: unknown."""


class LocationCache:
    def __init__(self, capacity: int = 1 << 18) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, Known] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> Known | None:
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                self._entries.move_to_end(key)
            return e

    def put(self, key: bytes, known: Known) -> None:
        with self._lock:
            self._entries[key] = known
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def forget(self, keys: list[bytes]) -> None:
        with self._lock:
            for k in keys:
                self._entries.pop(k, None)

    def __len__(self) -> int:
        return len(self._entries)
