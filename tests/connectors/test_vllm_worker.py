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


def worker(cluster: Cluster, fill: float | None) -> tuple[WorkerSide, list[torch.Tensor]]:
    cfg = ConnectorConfig(master=cluster.master_address, timeout=0.3, chunk_tokens=CHUNK)
    w = WorkerSide(cfg, model_id="tiny", block_size=BLOCK, kv_heads=HEADS, head_dim=DIM, tp_rank=0, tp_size=1,
                   load=True, save=True)
    buf = torch.rand(LAYERS, NBLOCKS, HEADS, BLOCK, 2 * DIM) if fill is None \
        else torch.full((LAYERS, NBLOCKS, HEADS, BLOCK, 2 * DIM), fill)
    layers = [buf[i] for i in range(LAYERS)]
    w.register_kv_caches(dict(zip(NAMES, layers, strict=True)))
    return w, layers


def saved(cluster: Cluster, salt: str) -> list[torch.Tensor]:
    w, layers = worker(cluster, None)
    meta = KVStoreConnectorMetadata(saves=[SaveSpec("p", TOKENS, salt, 0, 2, [0, 1, 2, 3])])
    for name in NAMES:
        w.save_kv_layer(meta, name)
    w.wait_for_save(meta)
    w.wait_idle()
    assert w.counters["saved_chunks"] == 2
    w.shutdown()
    return layers


def load(w: WorkerSide, salt: str) -> KVStoreConnectorMetadata:
    meta = KVStoreConnectorMetadata(loads=[LoadSpec("c", TOKENS, salt, 0, 64, [5, 6, 7, 8], False)])
    w.start_load_kv(meta)
    return meta


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


def test_an_overrunning_layer_load_is_abandoned_and_reported(cluster: Cluster, monkeypatch: Any) -> None:
    src = saved(cluster, "b")
    w, dst = worker(cluster, 0.0)
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
