"""Fixtures for the connector tests: a tiny local Llama, a real kvstore cluster, prompts.

Nothing is downloaded: the model is random-initialized and the tokenizer is
trained locally (``connectors.testing.tiny_model``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.testing.cluster import Cluster

CHUNK = 64
"""Chunk size of the tests (two vLLM blocks of 32 tokens), so short prompts span chunks."""
LENGTHS = (40, 64, 100, 200, 300)
"""Prompt lengths: shorter than a chunk, exactly one, and non-multiples of the chunk."""


def prompts(seed: int, lengths: tuple[int, ...] = LENGTHS, prefix: list[int] | None = None) -> list[list[int]]:
    """Random token prompts (distinct per seed), optionally after a shared ``prefix``."""
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(2, 500) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers", reason="needs transformers (pip install 'kvstore[hf]')")
    from connectors.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"), dram="256MiB")
    try:
        c.start(nodes=1)
        yield c
    finally:
        c.stop()


def corrupt_value(node_pid: int, value: bytes) -> int:
    """Flip one byte of ``value`` wherever process ``node_pid`` holds it in shared memory.

    Finds the node's arena through the shared segments it holds open (memfd or
    ``/dev/shm`` files, seen in ``/proc/PID/fd``), so it needs no knowledge of
    the node's internals. Returns how many copies changed.
    """
    paths = []
    for fd in Path(f"/proc/{node_pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(("/memfd:", "/dev/shm/")):
            paths.append(fd)
    changed = 0
    probe = value[:4096]
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        at = data.find(probe)
        while at >= 0:
            if data[at:at + len(value)] == value:
                with open(path, "r+b") as f:
                    f.seek(at + len(value) // 2)
                    b = f.read(1)
                    f.seek(at + len(value) // 2)
                    f.write(bytes([b[0] ^ 0xFF]))
                changed += 1
            at = data.find(probe, at + 1)
    return changed
