"""Placement and eviction choices for PutStart: pure functions over the state's records."""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from typing import Protocol

from kvstore.master.types import Node


class _Evictable(Protocol):
    size: int
    replicas: list[str]
    pinned: bool
    leases: int


def choose_nodes(
    nodes: Iterable[Node], size: int, replicas: int, client_host: str = ""
) -> list[Node] | None:
    """``replicas`` distinct nodes with ``size`` bytes free, most free first.

    The first is on ``client_host`` when a node there has room (the same-host
    fast path); ties break by node id so placement is deterministic. ``None``
    when fewer than ``replicas`` nodes have room.
    """
    fits = [n for n in nodes if n.free >= size]
    if len(fits) < replicas:
        return None
    fits.sort(key=lambda n: (-n.free, n.node_id))
    if client_host:
        for i, n in enumerate(fits):
            if n.host == client_host:
                if i:
                    fits.insert(0, fits.pop(i))
                break
    return fits[:replicas]


def eviction_victims(
    lru: Iterable[bytes],
    objects: Mapping[bytes, _Evictable],
    nodes: Mapping[str, Node],
    size: int,
    replicas: int,
    keep: Container[bytes] = (),
) -> list[bytes] | None:
    """Least recently used keys whose eviction lets ``replicas`` nodes fit ``size``.

    Only objects that are neither pinned nor leased nor in ``keep`` (the keys the
    same PutStart names: evicting one would only have it written again) and that
    have a replica on a node still short of room are chosen. A dry run: nothing is changed, and
    ``None`` means even evicting every candidate would not make room.
    """
    if sum(1 for n in nodes.values() if n.capacity >= size) < replicas:
        return None
    free = {nid: n.free for nid, n in nodes.items()}
    need = replicas - sum(1 for f in free.values() if f >= size)
    victims: list[bytes] = []
    for key in lru:
        if need <= 0:
            break
        obj = objects[key]
        if obj.pinned or obj.leases or key in keep or all(free[r] >= size for r in obj.replicas):
            continue
        victims.append(key)
        for r in obj.replicas:
            short = free[r] < size
            free[r] += obj.size
            if short and free[r] >= size:
                need -= 1
    return victims if need <= 0 else None
