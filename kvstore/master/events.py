"""The master's event stream (``Events.Watch``; ``kvstore events``): every chunk stored,
removed, evicted or lost and every node joined or left, numbered in order.

:class:`EventLog` keeps the last ``master.events_window`` events. A subscriber names the
last sequence number it saw: it gets everything after it that is still retained, then
new events as they happen. One that fell behind the window first gets a ``RESYNC``
event (what it missed is gone; rebuild from ``Lookup``). Events go out after the change
is in the master's journal. A tenant's credential sees only the events of its own keys
(and the node events).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable, Iterable

from kvstore.master.types import Event
from kvstore.v1 import master_pb2 as pb


class EventLog:
    """A bounded, numbered log of events; one event loop."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._log: collections.deque[pb.PoolEvent] = collections.deque(maxlen=window)
        self._next = 1
        self._changed = asyncio.Event()

    @property
    def last(self) -> int:
        return self._next - 1

    def add(self, events: Iterable[Event], now_ms: int) -> None:
        added = False
        for e in events:
            self._log.append(pb.PoolEvent(seq=self._next, kind=pb.PoolEvent.Kind.Value(e.kind), key=e.key,
                                          size=e.size, nodes=list(e.nodes), time_ms=now_ms))
            self._next += 1
            added = True
        if added:
            self._changed.set()
            self._changed = asyncio.Event()

    async def follow(self, after: int, visible: Callable[[pb.PoolEvent], bool],
                     alive: Callable[[], bool]) -> AsyncIterator[pb.PoolEvent]:
        """Events numbered after ``after`` (RESYNC first if some were dropped), then new ones,
        while ``alive()``."""
        oldest = self._log[0].seq if self._log else self._next
        if after + 1 < oldest:
            yield pb.PoolEvent(seq=oldest - 1, kind=pb.PoolEvent.RESYNC)
            after = oldest - 1
        while alive():
            oldest = self._log[0].seq if self._log else self._next
            if after + 1 < oldest:  # fell behind while waiting
                yield pb.PoolEvent(seq=oldest - 1, kind=pb.PoolEvent.RESYNC)
                after = oldest - 1
            for e in list(self._log)[max(after + 1 - oldest, 0):]:
                after = e.seq
                if visible(e):
                    yield e
            waiter = self._changed
            if self._next - 1 > after:
                continue
            try:
                await asyncio.wait_for(waiter.wait(), timeout=1.0)
            except TimeoutError:
                continue
