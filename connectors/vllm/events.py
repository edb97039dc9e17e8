"""KV events: the chunks an engine stored to or loaded from the pool, for vLLM's publisher.

With ``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'``
vLLM publishes its own block events (``BlockStored``/``BlockRemoved``, medium
``GPU``) on ZMQ, and asks the connector for more each step (``take_events``).
This connector adds one ``BlockStored`` with medium :data:`MEDIUM` per run of
chunks that it stored to the pool (after the pool acknowledged the put) or
loaded from it (after the bytes landed verified). They use vLLM's own block
hashes (``request.block_hashes``, converted as vLLM converts them for its
events), so a router that indexes vLLM's events learns, block by block, which
prefixes the pool holds beside each engine's GPU cache.

Flow: the scheduler puts the request's block hashes into the step's save and
load specs (only when events are on); each worker records events as its puts
and loads complete and returns them from ``get_kv_connector_kv_cache_events``;
vLLM concatenates the workers' containers into the step's
``KVConnectorOutput``; the scheduler side counts them (:class:`EventGate`) and
publishes an event once every tensor-parallel rank that holds its own copy of
the KV reported it (a chunk is in the pool only when all ranks stored it).
With MLA the ranks share one copy and only rank 0 reports.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

from vllm.distributed.kv_events import BlockStored, KVCacheEvent, KVConnectorKVEvents

MEDIUM = "KVSTORE"
"""``medium`` of the events this connector publishes (vLLM's own are ``GPU``/``CPU``)."""
PENDING_LIMIT = 10_000
"""Events waiting for the other ranks' reports; beyond this the oldest are dropped
(a rank whose save failed never reports, so its peers' events must not pile up)."""


class KVStoreKVEvents(KVConnectorKVEvents):
    """The events of one or more workers for one step (vLLM merges the workers' ones)."""

    def __init__(self, events: Sequence[KVCacheEvent] = (), num_workers: int = 1) -> None:
        self._events: list[KVCacheEvent] = list(events)
        self._workers = num_workers

    def add_events(self, events: list[KVCacheEvent]) -> None:
        self._events.extend(events)

    def aggregate(self) -> KVStoreKVEvents:
        return self  # ranks are matched by the scheduler's EventGate, across steps

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list[KVCacheEvent]:
        return list(self._events)

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._events.clear()


def chunk_event(hashes: Sequence[Any], tokens: Sequence[int], block_size: int, chunk_tokens: int,
                first: int, end: int) -> BlockStored | None:
    """``BlockStored`` (medium :data:`MEDIUM`) for chunks ``[first, end)`` of a request whose
    vLLM block hashes (from block 0) are ``hashes``; ``None`` when they do not reach that far."""
    bpc = chunk_tokens // block_size
    lo, hi = first * bpc, end * bpc
    if end <= first or len(hashes) < hi or len(tokens) < end * chunk_tokens:
        return None
    return BlockStored(block_hashes=list(hashes[lo:hi]), parent_block_hash=hashes[lo - 1] if lo else None,
                       token_ids=list(tokens[first * chunk_tokens:end * chunk_tokens]), block_size=block_size,
                       lora_id=None, medium=MEDIUM, lora_name=None, group_idx=0)


class EventGate:
    """Scheduler side: publishes an event once ``ranks`` workers reported it."""

    def __init__(self, limit: int = PENDING_LIMIT) -> None:
        self.limit = limit
        self._pending: OrderedDict[KVCacheEvent, int] = OrderedDict()
        self._ready: list[KVCacheEvent] = []
        self.dropped = 0

    def add(self, events: Sequence[KVCacheEvent], ranks: int) -> None:
        for event, n in Counter(events).items():
            seen = self._pending.pop(event, 0) + n
            if seen >= ranks:
                self._ready.append(event)
            else:
                self._pending[event] = seen
        while len(self._pending) > self.limit:
            self._pending.popitem(last=False)
            self.dropped += 1

    def take(self) -> list[KVCacheEvent]:
        out, self._ready = self._ready, []
        return out


_seeded_for: list[str | None] = [None]
"""The hash algorithm vLLM's seed hash was last set for by :func:`block_hashes`."""


def block_hashes(tokens: Sequence[int], block_size: int, *, hash_algo: str = "sha256",
                 cache_salt: str | None = None) -> list[Any]:
    """vLLM's block hashes of the full blocks of ``tokens``, as its KV events carry them:
    what a router computes for a prompt to look it up in an
    :class:`~kvstore.engine_events.EngineIndex`. ``hash_algo`` and ``block_size`` must be
    the engines' (``--prefix-caching-hash-algo``, ``--block-size``); prompts with LoRA or
    multimodal inputs hash extra keys this does not add. Sets vLLM's process-wide seed hash
    for ``hash_algo`` on first use (use it in a router, not inside an engine)."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils as kcu

    fn = get_hash_fn_by_name(hash_algo)
    if _seeded_for[0] != hash_algo:  # once per algorithm, not per prompt
        kcu.init_none_hash(fn)
        _seeded_for[0] = hash_algo
    out, parent = [], None
    for i in range(len(tokens) // block_size):
        extra = (("cache_salt", cache_salt),) if i == 0 and cache_salt else None
        parent = kcu.hash_block_tokens(fn, parent, tokens[i * block_size:(i + 1) * block_size], extra)
        out.append(kcu.maybe_convert_block_hash(parent))
    return out
