"""Hands read holds back to nodes off the caller's path, batched per node.

A get is done for the caller once its bytes are verified; telling the node it
may let go of them can happen a moment later. One thread drains a queue and
sends one ``Release`` per node per round. A release that fails is harmless:
the node reclaims holds after its TTL.
"""

from __future__ import annotations

import logging
import queue
import threading

from kvstore.client.connections import NodeConn
from kvstore.errors import KVStoreError
from kvstore.node.protocol import Op

log = logging.getLogger(__name__)


class Releaser:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[NodeConn, list[int]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kvstore-release", daemon=True)
        self._thread.start()

    def release(self, conn: NodeConn, handles: list[int]) -> None:
        """Queue ``handles`` for release on ``conn``'s node. Never blocks, never raises."""
        if handles:
            self._queue.put((conn, handles))

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while True:  # take whatever else is queued: one Release per node per round
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            by_node: dict[int, tuple[NodeConn, list[int]]] = {}
            for item in items:
                if item is not None:
                    conn, handles = item
                    by_node.setdefault(id(conn), (conn, []))[1].extend(handles)
            for conn, handles in by_node.values():
                try:
                    conn.control.call(Op.RELEASE, handles, timeout=5)
                except KVStoreError as e:
                    log.debug("release on node %s failed (reclaimed after its TTL): %s", conn.node_id, e)
            if None in items:
                return

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout=10)
