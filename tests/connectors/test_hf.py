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
