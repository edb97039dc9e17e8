"""What the scheduler side tells the worker side each step, and what workers tell it once.

Plain dataclasses of ints, strings and bytes: vLLM carries them between its
own processes. Token ids travel so that each worker derives chunk keys under
its *own* namespace (its tensor-parallel rank and raw layout), the single
source of truth for keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
)


@dataclass
class LoadSpec:
    """Load tokens ``[start, end)`` of one request from the store into ``block_ids``.

    ``start`` and ``end`` are block aligned; ``tokens`` holds the request's
    tokens up to the end of the last chunk touched (a whole number of chunks).
    ``block_ids[k]`` receives block ``start // block_size + k``.
    """

    req_id: str
    tokens: list[int]
    cache_salt: str
    start: int
    end: int
    block_ids: list[int]
    is_async: bool
    extras: list[bytes] = field(default_factory=list)
    """Per-chunk extra identity (LoRA, multimodal items) from the scheduler; see naming.chunk_extras."""
    block_hashes: list[Any] = field(default_factory=list)
    """vLLM's block hashes of ``tokens`` (as its KV events carry them), when KV events are on."""


@dataclass
class SaveSpec:
    """Save chunks ``[first_chunk, first_chunk + len(chunk_blocks))`` of one request.

    ``tokens`` holds the request's tokens up to the end of the last chunk;
    ``block_ids`` are the blocks of those chunks in order (a whole number of
    chunks' worth).
    """

    req_id: str
    tokens: list[int]
    cache_salt: str
    first_chunk: int
    num_chunks: int
    block_ids: list[int]
    extras: list[bytes] = field(default_factory=list)
    """Per-chunk extra identity (LoRA, multimodal items) from the scheduler; see naming.chunk_extras."""
    block_hashes: list[Any] = field(default_factory=list)
    """vLLM's block hashes of ``tokens`` (as its KV events carry them), when KV events are on."""


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    """One step's work: loads to run before/while the forward pass, saves to gather in it."""

    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class KVStoreHandshake(KVConnectorHandshakeMetadata):
    """A worker's namespace, sent once to the scheduler side after ``register_kv_caches``.

    The scheduler needs it to ask the master about the same keys the worker writes.
    """

    model: str
    """Namespace model string (model id + raw block layout + block size)."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    kind: str
    tp_rank: int
    tp_size: int
