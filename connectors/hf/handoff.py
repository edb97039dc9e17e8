"""Prefill in one process, decode in another, the KV handed over through kvstore.

``python -m connectors.hf.handoff prefill|decode|local MODEL_DIR MASTER TOKENS_JSON [N [CHUNK [DEVICE]]]``
prints one JSON line. Used by the tests and the demo; greedy decoding, on the CPU
or on ``DEVICE`` (``cuda``: the model, its cache and the chunks' bytes stay on the
GPU; the pool's bytes move by DMA, docs/gpu.md).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from connectors.hf.cache import export_cache, import_cache, model_namespace
from kvstore.client import Client


def _model(model_dir: str, device: str = "cpu") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.to(device)
    return model.eval()


def greedy(model: Any, tokens: list[int], n: int, cache: Any = None, cached: int = 0) -> list[int]:
    """Greedy continuation of ``tokens`` given a cache holding the first ``cached`` of them."""
    import torch
    from transformers import DynamicCache

    cache = cache if cache is not None else DynamicCache()
    out: list[int] = []
    dev = model.device
    ids = torch.tensor([tokens[cached:]], device=dev)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]], device=dev)
    return out


def prefill(model_dir: str, master: str, tokens: list[int], chunk_tokens: int, device: str = "cpu") -> dict[str, Any]:
    import torch
    from transformers import DynamicCache

    model = _model(model_dir, device)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([tokens], device=model.device), past_key_values=cache, use_cache=True)
    with Client(master) as c:
        n = export_cache(c, model_namespace(model, model_dir, chunk_tokens), tokens, cache)
    return {"chunks": n}


def decode(model_dir: str, master: str, tokens: list[int], n: int, chunk_tokens: int,
           device: str = "cpu") -> dict[str, Any]:
    model = _model(model_dir, device)
    with Client(master) as c:
        cache, cached = import_cache(c, model_namespace(model, model_dir, chunk_tokens), tokens,
                                     max_tokens=len(tokens) - 1, device=model.device)
    return {"tokens": greedy(model, tokens, n, cache, cached), "cached": cached}


def main(argv: list[str]) -> None:
    op, model_dir, master, toks = argv[:4]
    tokens = json.loads(toks)
    n = int(argv[4]) if len(argv) > 4 else 8
    chunk = int(argv[5]) if len(argv) > 5 else 64
    device = argv[6] if len(argv) > 6 else "cpu"
    if op == "prefill":
        res = prefill(model_dir, master, tokens, chunk, device)
    elif op == "decode":
        res = decode(model_dir, master, tokens, n, chunk, device)
    else:
        res = {"tokens": greedy(_model(model_dir, device), tokens, n)}
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
