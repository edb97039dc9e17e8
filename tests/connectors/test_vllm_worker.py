"""The vLLM worker side without an engine (real store): a layer load that overruns the
forward pass is abandoned (nothing scattered afterwards) and reported failed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from connectors.vllm.config import ConnectorConfig
from connectors.vllm.metadata import KVStoreConnectorMetadata, LoadSpec, SaveSpec
from connectors.vllm.worker import WorkerSide
from kvstore.testing.cluster import Cluster

BLOCK, HEADS, DIM, LAYERS, NBLOCKS, CHUNK = 16, 2, 8, 2, 16, 32
TOKENS = list(range(100, 164))  # two chunks of 32 tokens, four blocks
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("pool"), dram="64MiB")
    try:
        yield c.start(nodes=1)
    finally:
        c.stop()


def worker(cluster: Cluster, fill: float | None, **cfg_kw: Any) -> tuple[WorkerSide, list[torch.Tensor]]:
    cfg = ConnectorConfig(master=cluster.master_address, timeout=cfg_kw.pop("timeout", 0.3), chunk_tokens=CHUNK,
                          **cfg_kw)
    w = WorkerSide(cfg, model_id="tiny", block_size=BLOCK, kv_heads=HEADS, head_dim=DIM, tp_rank=0, tp_size=1,
                   load=True, save=True)
    buf = torch.rand(LAYERS, NBLOCKS, HEADS, BLOCK, 2 * DIM) if fill is None \
        else torch.full((LAYERS, NBLOCKS, HEADS, BLOCK, 2 * DIM), fill)
    layers = [buf[i] for i in range(LAYERS)]
    w.register_kv_caches(dict(zip(NAMES, layers, strict=True)))
    return w, layers


def save_step(w: WorkerSide, saves: list[SaveSpec]) -> None:
    """One step saving ``saves`` (two chunks in all), then the worker shut down."""
    meta = KVStoreConnectorMetadata(saves=saves)
    for name in NAMES:
        w.save_kv_layer(meta, name)
    w.wait_for_save(meta)
    w.wait_idle()
    assert w.counters["saved_chunks"] == 2
    w.shutdown()


def saved(cluster: Cluster, salt: str) -> list[torch.Tensor]:
    w, layers = worker(cluster, None)
    save_step(w, [SaveSpec("p", TOKENS, salt, 0, 2, [0, 1, 2, 3])])
    return layers


def load(w: WorkerSide, salt: str) -> KVStoreConnectorMetadata:
    meta = KVStoreConnectorMetadata(loads=[LoadSpec("c", TOKENS, salt, 0, 64, [5, 6, 7, 8], False)])
    w.start_load_kv(meta)
    return meta


def save_two_requests(w: WorkerSide, salt: str) -> None:
    """One step saving two requests' chunks (chunk 0 from blocks 0-1, chunk 1 from 2-3)."""
    save_step(w, [SaveSpec("p", TOKENS, salt, 0, 1, [0, 1]), SaveSpec("q", TOKENS, salt, 1, 1, [2, 3])])


def load_all_layers(w: WorkerSide, salt: str) -> None:
    """A sync load of both chunks into blocks 5-8, waited for layer by layer as a forward pass does."""
    meta = load(w, salt)
    for name in NAMES:
        w.wait_for_layer_load(name)
    w.wait_for_save(meta)


def test_layers_load_into_the_blocks_named(cluster: Cluster) -> None:
    src = saved(cluster, "a")
    w, dst = worker(cluster, 0.0)
    meta = load(w, "a")
    for name in NAMES:
        w.wait_for_layer_load(name)
    w.wait_for_save(meta)
    assert w.take_load_errors() == set()
    for layer in range(LAYERS):
        assert torch.equal(dst[layer][5:9], src[layer][0:4])
    w.shutdown()


def test_a_partial_load_writes_only_its_blocks_and_a_missing_chunk_fails_from_there(cluster: Cluster) -> None:
    """Blocks 1..2 of the prompt (chunk 0's second block, chunk 1's first) land in the
    blocks named; with chunk 1 gone, its block is reported failed, chunk 0's still loads."""
    src = saved(cluster, "e")
    w, dst = worker(cluster, 0.0)
    assert w.direct  # a host cache: ranges land straight in the blocks
    meta = KVStoreConnectorMetadata(loads=[LoadSpec("c", TOKENS, "e", 16, 48, [9, 11], False)])
    w.start_load_kv(meta)
    for name in NAMES:
        w.wait_for_layer_load(name)
    w.wait_for_save(meta)
    assert w.take_load_errors() == set()
    for layer in range(LAYERS):
        assert torch.equal(dst[layer][9], src[layer][1]) and torch.equal(dst[layer][11], src[layer][2])
        assert not dst[layer][10].any() and not dst[layer][12].any()  # untouched
    keys = w._keys(TOKENS, "e", [])
    from kvstore.client import Client

    with Client(cluster.master_address) as c:
        assert c.remove(keys[1])
    w.client._locations.forget([keys[1]])  # type: ignore[union-attr]
    meta = KVStoreConnectorMetadata(loads=[LoadSpec("d", TOKENS, "e", 0, 64, [0, 1, 2, 3], False)])
    w.start_load_kv(meta)
    for name in NAMES:
        w.wait_for_layer_load(name)
    w.wait_for_save(meta)
    assert w.take_load_errors() == {2, 3}
    for layer in range(LAYERS):
        assert torch.equal(dst[layer][0:2], src[layer][0:2])
    w.shutdown()


def test_an_overrunning_layer_load_is_abandoned_and_reported(cluster: Cluster, monkeypatch: Any) -> None:
    src = saved(cluster, "b")
    w, dst = worker(cluster, 0.0, load_inline=False)  # a loader thread the forward gives up on
    gate = threading.Event()
    real = w._load_layers

    def slow(plan: Any, layers: list[int]) -> None:
        if 1 in layers:  # layer 1 arrives only after the forward pass gave up on it
            gate.wait(30)
        real(plan, layers)

    monkeypatch.setattr(w, "_load_layers", slow)
    meta = load(w, "b")
    w.wait_for_layer_load(NAMES[0])
    assert torch.equal(dst[0][5:9], src[0][0:4])
    w.wait_for_layer_load(NAMES[1])  # times out (2 x timeout): the step runs on without it
    gate.set()
    w.wait_for_save(meta)  # end of step: the loader finished
    assert w.take_load_errors() == {5, 6, 7, 8}  # every block of the abandoned load
    assert w.counters["load_timeouts"] == 1
    assert torch.count_nonzero(dst[1][5:9]) == 0  # and nothing was scattered after giving up
    w.shutdown()


def save(w: WorkerSide, rid: str, salt: str) -> KVStoreConnectorMetadata:
    meta = KVStoreConnectorMetadata(saves=[SaveSpec(rid, TOKENS, salt, 0, 2, [0, 1, 2, 3])])
    for name in NAMES:
        w.save_kv_layer(meta, name)
    w.wait_for_save(meta)
    return meta


def stored(cluster: Cluster, salt: str) -> int:
    from connectors.vllm.naming import keys_for, namespace
    w, _ = worker(cluster, None)
    assert w.handshake is not None
    keys = keys_for(namespace(w.handshake, CHUNK, salt), TOKENS)
    n = w.client.longest_prefix(keys)
    w.shutdown()
    return n


def test_a_full_save_backlog_drops_saves_without_blocking(cluster: Cluster) -> None:
    one = LAYERS * 4 * 2 * BLOCK * HEADS * DIM * 4  # bytes gathered for the 4 blocks of one save
    w, _ = worker(cluster, None, save_backlog_bytes=one)
    gate = threading.Event()
    real = w.client.put_batch
    w.client.put_batch = lambda *a, **k: (gate.wait(30), real(*a, **k))[1]  # type: ignore[method-assign]
    save(w, "first", "backlog")  # fills the backlog; its put waits at the gate
    save(w, "second", "backlog-2")  # no room: dropped at once, nothing gathered
    assert w.counters["save_dropped_backlog"] == 2
    assert w.get_finished({"second"}) == ({"second"}, None)  # a dropped save still finishes its request
    gate.set()
    w.wait_idle()
    assert w.get_finished({"first"}) == ({"first"}, None)
    assert w._backlog_bytes == 0
    save(w, "third", "backlog-3")  # room again
    w.wait_idle()
    assert w.counters["saved_chunks"] == 4
    w.shutdown()


def test_shutdown_flushes_queued_saves(cluster: Cluster) -> None:
    w, _ = worker(cluster, None, timeout=5.0)
    for i in range(3):
        save(w, f"r{i}", f"flush-{i}")
    w.shutdown()  # right after handing them over, as an exiting producer does
    assert w.counters["saved_chunks"] == 6
    assert all(stored(cluster, f"flush-{i}") == 2 for i in range(3))


def test_shutdown_gives_up_on_a_stalled_store_in_bounded_time(cluster: Cluster) -> None:
    import time
    w, _ = worker(cluster, None, timeout=5.0, shutdown_flush_timeout=0.5)
    gate = threading.Event()
    real = w.client.put_batch
    w.client.put_batch = lambda *a, **k: (gate.wait(30), real(*a, **k))[1]  # type: ignore[method-assign]
    for i in range(3):
        save(w, f"s{i}", f"stall-{i}")
    t = time.monotonic()
    w.shutdown()
    assert time.monotonic() - t < 3
    assert w.counters["save_dropped_shutdown"] == 6  # all three saves (2 chunks each), logged
    gate.set()


def test_load_inline_defaults_to_inline_for_a_host_cache(cluster: Cluster) -> None:
    from kvstore.errors import ConfigError

    base = {"master": cluster.master_address}
    assert ConnectorConfig.from_extra({**base, "load_inline": "auto"}).load_inline is None
    assert ConnectorConfig.from_extra({**base, "load_inline": "true"}).load_inline is True
    with pytest.raises(ConfigError, match="load_inline"):
        ConnectorConfig.from_extra({**base, "load_inline": "sometimes"})
    w, _ = worker(cluster, 0.0)
    assert w.inline and w._layer_groups(1 << 20) == [list(range(LAYERS))]  # one call, every layer
    w.shutdown()
    w, _ = worker(cluster, 0.0, load_inline=False)
    assert not w.inline and w._layer_groups(1 << 20)[0] == [0]
    w.shutdown()


@pytest.mark.gpu
def test_gpu_cache_saves_and_loads_on_side_streams(cluster: Cluster) -> None:
    """A CUDA cache: saves gather every block of the step in one launch per layer on the
    save stream; loads land in device staging and scatter on the load stream, and the
    compute stream waits for each layer's event."""
    cfg = ConnectorConfig(master=cluster.master_address, timeout=5.0, chunk_tokens=CHUNK)

    def gpu_worker(fill: float | None) -> tuple[WorkerSide, list[torch.Tensor]]:
        w = WorkerSide(cfg, model_id="tiny", block_size=BLOCK, kv_heads=HEADS, head_dim=DIM, tp_rank=0,
                       tp_size=1, load=True, save=True)
        shape = (LAYERS, NBLOCKS, HEADS, BLOCK, 2 * DIM)
        buf = torch.rand(shape, device="cuda") if fill is None else torch.full(shape, fill, device="cuda")
        layers = [buf[i] for i in range(LAYERS)]
        w.register_kv_caches(dict(zip(NAMES, layers, strict=True)))
        return w, layers

    src_w, src = gpu_worker(None)
    assert src_w.gpu
    save_two_requests(src_w, "g")
    w, dst = gpu_worker(0.0)
    load_all_layers(w, "g")
    torch.cuda.synchronize()
    assert w.take_load_errors() == set() and w._gpu_loads
    for layer in range(LAYERS):
        assert torch.equal(dst[layer][5:9], src[layer][0:4])
    w.shutdown()


def test_the_cuda_path_plumbing_with_a_host_stand_in(cluster: Cluster, monkeypatch: Any) -> None:
    """The worker's CUDA path (connectors.vllm.gpu) run against a host stand-in
    (connectors.testing.fake_gpu): the step's saves share one gather per layer and each
    stores its own columns; the save thread waits before it stores; the step's loads
    share one scatter per layer (each block from its slot of the staging), settle the
    staging before reuse, run behind the compute stream's event and make the compute
    stream wait per layer."""
    import connectors.vllm.worker as worker_mod
    from connectors.testing import fake_gpu

    monkeypatch.setattr(worker_mod, "gpu", fake_gpu)
    fake_gpu.calls.clear()

    def as_gpu(w: WorkerSide) -> WorkerSide:
        w.gpu, w.direct, w.inline = True, False, False
        return w

    src_w, src = worker(cluster, None)
    save_two_requests(as_gpu(src_w), "f")
    assert fake_gpu.calls[:3] == [("saves", (0, 1, 2, 3)), ("gather", 0, 4), ("gather", 1, 4)]
    assert fake_gpu.calls.count(("save_wait",)) == 2  # each save waited for the step's copies
    fake_gpu.calls.clear()
    w, dst = worker(cluster, 0.0, timeout=5.0)
    as_gpu(w)
    meta = KVStoreConnectorMetadata(loads=[LoadSpec("c", TOKENS, "f", 0, 64, [5, 6, 7, 8], False),
                                           LoadSpec("d", TOKENS, "f", 32, 64, [12, 13], False)])
    w.start_load_kv(meta)
    for name in NAMES:
        w.wait_for_layer_load(name)
    w.wait_for_save(meta)
    assert w.take_load_errors() == set()
    for layer in range(LAYERS):
        assert torch.equal(dst[layer][5:9], src[layer][0:4])
        assert torch.equal(dst[layer][12:14], src[layer][2:4])  # the second chunk only
        assert not dst[layer][9:12].any() and not dst[layer][14:].any()
    scatters = [c for c in fake_gpu.calls if c[0] == "scatter"]
    # one launch per layer for both requests' blocks, behind the compute stream's event
    assert [(c[1], c[2]) for c in scatters] == [(0, (5, 6, 7, 8, 12, 13)), (1, (5, 6, 7, 8, 12, 13))]
    assert all(c[3] for c in scatters)
    assert [c for c in fake_gpu.calls if c[0] == "device_wait"] == \
        [("device_wait", ("scattered", 0)), ("device_wait", ("scattered", 1))]
    first_scatter = fake_gpu.calls.index(scatters[0])
    assert ("settle",) in fake_gpu.calls[:first_scatter]  # staging settled before it was filled
    w.shutdown()
