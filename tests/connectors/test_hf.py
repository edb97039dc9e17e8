"""transformers adapter: prefill in one process, decode in another from the store, token-identical."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvstore.testing.cluster import Cluster
from tests.connectors.conftest import prompts

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "connectors.hf.handoff", *args], capture_output=True,
                         env=env, cwd=str(ROOT), timeout=300, check=True)
    return dict(json.loads(out.stdout.decode().strip().splitlines()[-1]))


@pytest.mark.parametrize("length", [128, 150])
def test_prefill_here_decode_there(tiny_model: Path, tmp_path: Path, length: int) -> None:
    pytest.importorskip("torch", reason="needs torch")
    tokens = prompts(21 + length, (length,))[0]
    with Cluster(tmp_path / "c", dram="64MiB").start(nodes=1) as cl:
        want = _run("local", str(tiny_model), cl.master_address, json.dumps(tokens), "8")["tokens"]
        stored = _run("prefill", str(tiny_model), cl.master_address, json.dumps(tokens), "8", "64")
        assert stored["chunks"] == length // 64
        got = _run("decode", str(tiny_model), cl.master_address, json.dumps(tokens), "8", "64")
    assert got["cached"] == (length - 1) // 64 * 64 > 0
    assert got["tokens"] == want


def test_cache_round_trip_through_an_embedded_store(tiny_model: Path) -> None:
    """export_cache/import_cache take an embedded LocalStore too (the GPU check runs this
    with an HBM tier on CUDA): the imported cache equals the exported one."""
    torch = pytest.importorskip("torch", reason="needs torch")
    from transformers import DynamicCache

    from connectors.hf.cache import export_cache, import_cache, model_namespace
    from connectors.hf.handoff import _model
    from kvstore import LocalStore

    model = _model(str(tiny_model))
    tokens = prompts(5, (130,))[0]
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True)
    ns = model_namespace(model, str(tiny_model), 64)
    with LocalStore(dram="64MiB", prefault=False) as store:
        assert export_cache(store, ns, tokens, cache) == 2
        got, n = import_cache(store, ns, tokens)
    assert n == 128
    layers = cache.layers if hasattr(cache, "layers") else None
    for i in range(model.config.num_hidden_layers):
        k0, v0 = (layers[i].keys, layers[i].values) if layers is not None else (cache.key_cache[i], cache.value_cache[i])
        k1, v1 = (got.layers[i].keys, got.layers[i].values) if layers is not None else (got.key_cache[i], got.value_cache[i])
        assert torch.equal(k1, k0[:, :, :128]) and torch.equal(v1, v0[:, :, :128])


@pytest.mark.gpu
def test_gpu_prefill_here_decode_there(tiny_model: Path, tmp_path: Path) -> None:
    tokens = prompts(33, (150,))[0]
    with Cluster(tmp_path / "c", dram="64MiB").start(nodes=1) as cl:
        want = _run("local", str(tiny_model), cl.master_address, json.dumps(tokens), "8", "64", "cuda")["tokens"]
        assert _run("prefill", str(tiny_model), cl.master_address, json.dumps(tokens), "8", "64", "cuda")["chunks"] == 2
        got = _run("decode", str(tiny_model), cl.master_address, json.dumps(tokens), "8", "64", "cuda")
    assert got["cached"] == 128 and got["tokens"] == want
