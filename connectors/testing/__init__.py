"""Test helpers for the engine connectors: tiny local models, engine runners.

Nothing here downloads anything: models are random-initialized and tokenizers
trained on a built-in corpus, both saved to a directory the caller owns.
"""

from connectors.testing.tiny_model import (
    TinyModelSpec,
    build_tiny_deepseek,
    build_tiny_llama,
    build_tiny_lora,
)

__all__ = ["TinyModelSpec", "build_tiny_deepseek", "build_tiny_llama", "build_tiny_lora"]
