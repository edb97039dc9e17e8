"""Prefill in one process, decode in another, the KV handed over through kvstore.

``python -m connectors.hf.handoff prefill|decode|local MODEL_DIR MASTER TOKENS_JSON [N]``
prints one JSON line. Used by the tests and the demo; greedy decoding, CPU.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from connectors.hf.cache import export_cache, import_cache, model_namespace
from kvstore.client import Client


def _model(model_dir: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]


def greedy(model: Any, tokens: list[int], n: int, cache: Any = None, cached: int = 0) -> list[int]:
    """Greedy continuation of ``tokens`` given a cache holding the first ``cached`` of them."""
    import torch
    from transformers import DynamicCache

    cache = cache if cache is not None else DynamicCache()
    out: list[int] = []
    ids = torch.tensor([tokens[cached:]])
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.tensor([[nxt]])
    return out


def prefill(model_dir: str, master: str, tokens: list[int], chunk_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import DynamicCache

    model = _model(model_dir)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True)
    with Client(master) as c:
        n = export_cache(c, model_namespace(model, model_dir, chunk_tokens), tokens, cache)
    return {"chunks": n}


def decode(model_dir: str, master: str, tokens: list[int], n: int, chunk_tokens: int) -> dict[str, Any]:
    model = _model(model_dir)
    with Client(master) as c:
        cache, cached = import_cache(c, model_namespace(model, model_dir, chunk_tokens), tokens,
                                     max_tokens=len(tokens) - 1)
    return {"tokens": greedy(model, tokens, n, cache, cached), "cached": cached}


def main(argv: list[str]) -> None:
    op, model_dir, master, toks = argv[:4]
    tokens = json.loads(toks)
    n = int(argv[4]) if len(argv) > 4 else 8
    chunk = int(argv[5]) if len(argv) > 5 else 64
    if op == "prefill":
        res = prefill(model_dir, master, tokens, chunk)
    elif op == "decode":
        res = decode(model_dir, master, tokens, n, chunk)
    else:
        res = {"tokens": greedy(_model(model_dir), tokens, n)}
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
