"""Eviction policies: which chunk of a tier goes first when room is needed.

A policy only orders keys; the :class:`~kvstore.tiers.manager.TierManager`
decides when to evict and skips pinned or busy keys itself. Contract (one
instance per tier, called under the manager's lock, so not thread-safe itself):

``touch(key)``    the key was stored or read: it becomes the most valuable
``discard(key)``  the key left the tier (no-op if unknown)
``victims()``     keys, least valuable first (a snapshot: safe to discard while iterating)
``key in p``, ``len(p)``

:data:`POLICIES` maps a name to a factory (``LRU`` today).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol


class EvictionPolicy(Protocol):
    def touch(self, key: bytes) -> None: ...

    def discard(self, key: bytes) -> None: ...

    def victims(self) -> Iterator[bytes]: ...

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...


class LRU:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def touch(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def discard(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[bytes]:
        return iter(list(self._order))

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)


POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRU}
