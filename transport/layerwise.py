"""Layer-wise streams: move a request's chunks layer by layer so transfer overlaps compute.

Chunk bytes are layer-major, so "layer ``l`` of chunk ``c``" is one contiguous
range in the producer's memory and one in the consumer's. The producer
(:class:`LayerSender`) publishes ``(chunk, layer)`` ranges in any order as
soon as they are ready; once every chunk of a layer has landed it sends the
notification :func:`layer_tag` ``(stream, l)``, exactly once per layer. The
consumer (:class:`LayerReceiver`) waits for layer ``l`` alone and gets each
layer exactly once.

Back-pressure: :meth:`LayerSender.publish` blocks while more than
``max_in_flight`` bytes are posted but not yet acknowledged, so a fast
producer cannot queue unbounded transfers behind a slow link.

Both classes are thread-safe. The producer must keep a published range's bytes
unchanged until :meth:`LayerSender.finish` returns (the transport's buffer rule).
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable

from kvstore.errors import InvalidArgument, KVStoreError, Timeout
from transport.base import Peer, Transport
from transport.handle import Handle
from transport.regions import Desc

_TAG = struct.Struct("<4s16sI")

# (chunk, layer) -> the descriptor moving that range
RangeFn = Callable[[int, int], Desc]


def layer_tag(stream: bytes, layer: int) -> bytes:
    """Notification meaning "every chunk of ``layer`` of ``stream`` has landed"."""
    if len(stream) != 16:
        raise InvalidArgument(f"stream id must be 16 bytes, got {len(stream)}")
    return _TAG.pack(b"KVLW", stream, layer)


class LayerSender:
    """Producer side of one stream. See the module docstring."""

    def __init__(
        self,
        transport: Transport,
        peer: Peer,
        stream: bytes,
        chunks: int,
        layers: int,
        range_of: RangeFn,
        *,
        max_in_flight: int = 256 << 20,
        timeout: float | None = 30.0,
        checksum: bool = False,
    ) -> None:
        if chunks < 1 or layers < 1:
            raise InvalidArgument(f"need >= 1 chunk and layer, got {chunks}x{layers}")
        layer_tag(stream, 0)
        self.t, self.peer, self.stream = transport, peer, stream
        self.chunks, self.layers = chunks, layers
        self.range_of = range_of
        self.max_in_flight = max_in_flight
        self.timeout, self.checksum = timeout, checksum
        self._cv = threading.Condition()
        self._published: set[tuple[int, int]] = set()
        self._landed = [0] * layers
        self._in_flight = 0
        self._pending: list[Handle] = []
        self._error: BaseException | None = None

    def publish(self, chunk: int, layer: int) -> None:
        """Post the range of ``(chunk, layer)``; blocks while back-pressure applies.

        Raises InvalidArgument for an out-of-range or repeated pair, and the
        stream's first transfer error, if any, so a producer stops early.
        """
        if not (0 <= chunk < self.chunks and 0 <= layer < self.layers):
            raise InvalidArgument(f"(chunk {chunk}, layer {layer}) outside {self.chunks}x{self.layers}")
        d = self.range_of(chunk, layer)
        end = None if self.timeout is None else time.monotonic() + self.timeout
        with self._cv:
            if (chunk, layer) in self._published:
                raise InvalidArgument(f"(chunk {chunk}, layer {layer}) published twice")
            while self._error is None and self._in_flight and self._in_flight + d.length > self.max_in_flight:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    raise Timeout(f"layer stream back-pressure did not ease within {self.timeout}s")
                self._cv.wait(left)
            if self._error is not None:
                raise self._error
            self._published.add((chunk, layer))
            self._in_flight += d.length
        h = self.t.write(self.peer, [d], timeout=self.timeout, checksum=self.checksum)
        with self._cv:
            self._pending.append(h)
        h.add_done_callback(lambda h: self._landed_one(layer, d.length, h))

    def _landed_one(self, layer: int, nbytes: int, h: Handle) -> None:
        err = h.exception()
        with self._cv:
            self._in_flight -= nbytes
            if err is not None and self._error is None:
                self._error = err
            if err is None:
                self._landed[layer] += 1
                complete = self._landed[layer] == self.chunks
            else:
                complete = False
            self._cv.notify_all()
        if complete:
            nh = self.t.notify(self.peer, layer_tag(self.stream, layer), timeout=self.timeout)
            with self._cv:
                self._pending.append(nh)

    def finish(self, timeout: float | None = None) -> None:
        """Wait until every published range landed and its notification went out.

        Raises the first error of the stream (TransportError, Timeout, ...).
        """
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cv:
                pending, self._pending = self._pending, []
            if not pending:
                break
            for h in pending:
                h.wait(None if end is None else max(0.0, end - time.monotonic()))
        if self._error is not None:
            raise self._error


class LayerReceiver:
    """Consumer side of one stream: wait for layer ``l`` alone. See the module docstring."""

    def __init__(self, transport: Transport, stream: bytes, layers: int) -> None:
        layer_tag(stream, 0)
        self.t, self.stream, self.layers = transport, stream, layers
        self._lock = threading.Lock()
        self._ready: set[int] = set()

    def wait_layer(self, layer: int, timeout: float | None = None) -> None:
        """Block until ``layer`` has landed; raises Timeout, or InvalidArgument if already taken."""
        self._claim(layer)
        try:
            self.t.notifications.wait_for(layer_tag(self.stream, layer), timeout)
        except KVStoreError:
            self._unclaim(layer)
            raise

    async def layer(self, layer: int, timeout: float | None = None) -> None:
        """Awaitable :meth:`wait_layer`."""
        self._claim(layer)
        try:
            await self.t.notifications.wait_for_async(layer_tag(self.stream, layer), timeout)
        except KVStoreError:
            self._unclaim(layer)
            raise

    def _claim(self, layer: int) -> None:
        if not 0 <= layer < self.layers:
            raise InvalidArgument(f"layer {layer} outside 0..{self.layers - 1}")
        with self._lock:
            if layer in self._ready:
                raise InvalidArgument(f"layer {layer} was already received")
            self._ready.add(layer)

    def _unclaim(self, layer: int) -> None:
        with self._lock:
            self._ready.discard(layer)
