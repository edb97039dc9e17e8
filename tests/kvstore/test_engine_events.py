"""EngineIndex: what engines' KV events say each instance (and the pool) holds."""

from __future__ import annotations

import msgpack
import pytest

from kvstore.engine_events import POOL, EngineIndex, PrefixMatch
from kvstore.errors import InvalidArgument


def _stored(hashes: list[int], medium: str = "GPU") -> dict[str, object]:
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None, "token_ids": [],
            "block_size": 16, "lora_id": None, "medium": medium, "lora_name": None}


def test_leading_blocks_per_instance_and_pool() -> None:
    idx = EngineIndex(["a", "b"])
    idx.apply("a", [_stored([1, 2, 3])])
    idx.apply("b", [_stored([1, 2]), _stored([1, 2, 3, 4], POOL)])
    m = idx.match([1, 2, 3, 4, 5])
    assert m == PrefixMatch({"a": 3, "b": 2}, pool=4) and m.best() == "a"
    assert idx.match([9, 1, 2]) == PrefixMatch({"a": 0, "b": 0}, pool=0)
    assert idx.match([9]).best() is None
    # a hole ends the prefix, even if later blocks are held
    idx.apply("a", [{"type": "BlockRemoved", "block_hashes": [2], "medium": "GPU"}])
    assert idx.match([1, 2, 3]).instances["a"] == 1


def test_clear_drops_the_engines_cache_not_the_pool() -> None:
    idx = EngineIndex(["a"])
    idx.apply("a", [_stored([1, 2]), _stored([1, 2], POOL), _stored([1], "CPU")])
    idx.apply("a", [{"type": "AllBlocksCleared"}])
    assert idx.match([1, 2]) == PrefixMatch({"a": 0}, pool=2) and idx.counters["cleared"] == 1


def test_capacity_drops_the_oldest() -> None:
    idx = EngineIndex(["a"], capacity=3)
    idx.apply("a", [_stored([1, 2]), _stored([3, 4])])
    assert idx.match([1]).instances["a"] == 0 and idx.match([3, 4]).instances["a"] == 2


def test_batches_as_published_and_bad_input() -> None:
    idx = EngineIndex(["a"])
    idx.apply_batch("a", msgpack.packb([1.5, [_stored([7, 8])], None]))
    assert idx.match([7, 8]).instances["a"] == 2 and idx.counters["batches"] == 1
    idx.apply_batch("a", b"\xc1not msgpack")
    idx.apply_batch("a", msgpack.packb([1.5, "no events"]))
    assert idx.counters["undecodable"] == 2 and idx.match([7, 8]).instances["a"] == 2
    with pytest.raises(InvalidArgument, match="unknown instance"):
        idx.apply("zzz", [])
    with pytest.raises(InvalidArgument, match="capacity"):
        EngineIndex(capacity=0)
