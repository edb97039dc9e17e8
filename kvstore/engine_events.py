"""A prefix index for routers, fed by the engines' own KV-event streams.

vLLM publishes what its prefix cache holds as KV events on ZMQ
(``--kv-events-config``: ``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``,
each with a ``medium``); with the kvstore connector the same stream also carries
``BlockStored`` with medium ``KVSTORE`` for the chunks the engine stored to or
loaded from the pool (:mod:`connectors.vllm.events`). :class:`EngineIndex` keeps,
per registered engine instance and medium, the block hashes the events say are
held, and :meth:`EngineIndex.match` answers for a prompt's block hashes how many
leading blocks each instance holds in its own GPU cache and how many the pool
holds (as any instance reported). :class:`EventSubscriber` feeds an index from the
instances' ZMQ endpoints on a background thread.

Block hashes are vLLM's (``request.block_hashes`` as its events carry them: 64-bit
ints by default); a router computes them for a prompt with
:func:`connectors.vllm.events.block_hashes` (which needs vLLM installed). The
pool's own answer, in chunks, is ``Client.longest_prefix`` of the chunk keys.
Nothing here imports vLLM: batches are decoded as plain msgpack.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvstore.errors import InvalidArgument

log = logging.getLogger(__name__)

GPU = "GPU"
POOL = "KVSTORE"
"""The medium of the kvstore connector's events (``connectors.vllm.events.MEDIUM``)."""


@dataclass
class PrefixMatch:
    """How much of a prompt's leading blocks is cached where."""

    instances: dict[str, int] = field(default_factory=dict)
    """Per instance: leading blocks in its own GPU cache."""
    pool: int = 0
    """Leading blocks the pool holds, as the instances' events reported."""

    def best(self) -> str | None:
        """The instance holding the longest prefix (None if none holds any)."""
        if not self.instances or max(self.instances.values()) == 0:
            return None
        return max(self.instances, key=lambda k: self.instances[k])


class _Held:
    """Block hashes one instance holds in one medium; least recently stored dropped beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hashes: OrderedDict[Any, None] = OrderedDict()

    def add(self, hashes: Iterable[Any]) -> None:
        for h in hashes:
            self.hashes[h] = None
            self.hashes.move_to_end(h)
        while len(self.hashes) > self.capacity:
            self.hashes.popitem(last=False)

    def remove(self, hashes: Iterable[Any]) -> None:
        for h in hashes:
            self.hashes.pop(h, None)

    def leading(self, hashes: Sequence[Any]) -> int:
        n = 0
        for h in hashes:
            if h not in self.hashes:
                break
            n += 1
        return n


class EngineIndex:
    """Per engine instance and medium, the block hashes its KV events say it holds. Thread-safe."""

    def __init__(self, instances: Iterable[str] = (), *, capacity: int = 1 << 20) -> None:
        if capacity <= 0:
            raise InvalidArgument(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._held: dict[str, dict[str, _Held]] = {}
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {"batches": 0, "events": 0, "cleared": 0, "undecodable": 0}
        for name in instances:
            self.register(name)

    def register(self, instance: str) -> None:
        with self._lock:
            self._held.setdefault(instance, {})

    @property
    def instances(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def apply(self, instance: str, events: Sequence[Mapping[str, Any]]) -> None:
        """Apply decoded events (``{"type": "BlockStored", "block_hashes": [...], "medium": ...}``)."""
        with self._lock:
            media = self._held.get(instance)
            if media is None:
                raise InvalidArgument(f"unknown instance {instance!r}; register it first")
            for e in events:
                kind = e.get("type")
                medium = e.get("medium") or GPU
                if kind == "BlockStored":
                    media.setdefault(medium, _Held(self.capacity)).add(e.get("block_hashes") or ())
                elif kind == "BlockRemoved":
                    if medium in media:
                        media[medium].remove(e.get("block_hashes") or ())
                elif kind == "AllBlocksCleared":  # the engine dropped its own caches, not the pool
                    for m in [m for m in media if m != POOL]:
                        del media[m]
                    self.counters["cleared"] += 1
                self.counters["events"] += 1

    def apply_batch(self, instance: str, payload: bytes) -> None:
        """Apply one published batch (vLLM's ``KVEventBatch``, msgpack: ``[ts, events, dp_rank]``)."""
        try:
            batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            events = batch[1]
            if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
                raise ValueError("events are not a list of maps")
        except (ValueError, TypeError, IndexError, msgpack.UnpackException) as e:
            self.counters["undecodable"] += 1
            log.warning("undecodable KV-event batch from %s: %s", instance, e)
            return
        self.apply(instance, events)
        self.counters["batches"] += 1

    def match(self, block_hashes: Sequence[Any]) -> PrefixMatch:
        """Leading blocks of ``block_hashes`` each instance holds on GPU, and the pool holds."""
        with self._lock:
            out = PrefixMatch()
            for name, media in self._held.items():
                gpu = media.get(GPU)
                out.instances[name] = gpu.leading(block_hashes) if gpu is not None else 0
                pool = media.get(POOL)
                if pool is not None:
                    out.pool = max(out.pool, pool.leading(block_hashes))
            return out


class EventSubscriber:
    """Feeds an :class:`EngineIndex` from the instances' ZMQ KV-event endpoints.

    ``endpoints`` maps an instance name to the endpoint its engine publishes on
    (vLLM's ``--kv-events-config`` ``endpoint``: an engine given a wildcard
    ``tcp://*:PORT`` or an ``ipc://`` path binds it, and the subscriber connects;
    ``topic`` as configured there). Needs ``pyzmq`` (``pip install 'kvstore[router]'``).
    """

    def __init__(self, index: EngineIndex, endpoints: Mapping[str, str], topic: str = "") -> None:
        try:
            import zmq
        except ImportError as e:
            raise InvalidArgument("engine events need pyzmq: pip install 'kvstore[router]'") from e
        if not endpoints:
            raise InvalidArgument("no engine event endpoints given")
        self.index = index
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._socks: dict[Any, str] = {}
        self.last_seq: dict[str, int] = {}
        self.gaps: dict[str, int] = {}
        """Per instance: batches missed (sequence numbers skipped), e.g. while not connected."""
        for name, endpoint in endpoints.items():
            index.register(name)
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self._socks[sock] = name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvstore-engine-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        zmq = self._zmq
        poller = zmq.Poller()
        for sock in self._socks:
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(100):
                name = self._socks[sock]
                parts = sock.recv_multipart()
                if len(parts) != 3 or len(parts[1]) != 8:
                    self.index.counters["undecodable"] += 1
                    continue
                seq = int.from_bytes(parts[1], "big")
                last = self.last_seq.get(name)
                if last is not None and seq > last + 1:
                    self.gaps[name] = self.gaps.get(name, 0) + seq - last - 1
                self.last_seq[name] = seq
                self.index.apply_batch(name, parts[2])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self._socks:
            sock.close(0)
        self._ctx.term()

    def __enter__(self) -> EventSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
