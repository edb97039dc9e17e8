"""Opt-in cache of where keys live, so reads can skip the master's Lookup.

Only for content-addressed keys (such as chunk keys), whose bytes never change
while the key exists. A cached read asks the remembered node directly; the
node's size and checksum must equal the cached ones and the bytes must verify,
else the client falls back to a Lookup. What it gives up: a key removed through
the master stays readable from its node until the removal reaches that node
(one heartbeat). Thread-safe, bounded (least recently used entries go first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from kvstore.v1 import master_pb2 as mpb


@dataclass(frozen=True)
class Known:
    node: mpb.NodeInfo
    size: int
    checksum: int


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

    def put(self, key: bytes, node: mpb.NodeInfo, size: int, checksum: int) -> None:
        with self._lock:
            self._entries[key] = Known(node, size, checksum)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def forget(self, keys: list[bytes]) -> None:
        with self._lock:
            for k in keys:
                self._entries.pop(k, None)

    def __len__(self) -> int:
        return len(self._entries)
