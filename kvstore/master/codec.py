"""The master's persisted records: RocksDB keys and msgpack values (never pickle).

=================  ==========================================================
db key             value (msgpack)
=================  ==========================================================
``o/`` + key       ``[size, checksum, [node_id, ...], pinned]`` (complete objects)
``n/`` + node_id   ``[epoch, host, control_address, [[scheme, metadata, region]],
                   [[tier, capacity, used]]]``
``m/epoch``        next node epoch to hand out
``m/gen``          restart generation (high bits of put and lease ids)
=================  ==========================================================

Pending reservations, leases and the LRU order are not persisted.
"""

from __future__ import annotations

from typing import Any

import msgpack

from kvstore.errors import Corruption
from kvstore.master.types import Endpoint, TierCapacity

OBJECT = b"o/"
NODE = b"n/"
META_EPOCH = b"m/epoch"
META_GEN = b"m/gen"

Record = tuple[bytes, bytes | None]  # (db key, value); None deletes


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(raw: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise Corruption(f"master record {what}: undecodable ({e})") from e


def object_record(key: bytes, size: int, checksum: int, replicas: list[str], pinned: bool) -> Record:
    return OBJECT + key, pack([size, checksum, replicas, pinned])


def decode_object(raw: bytes) -> tuple[int, int, list[str], bool]:
    v = unpack(raw, "object")
    try:
        size, checksum, replicas, pinned = v
        out = int(size), int(checksum), [str(r) for r in replicas], bool(pinned)
    except (TypeError, ValueError) as e:
        raise Corruption(f"master object record malformed: {v!r:.80}") from e
    return out


def node_record(
    node_id: str,
    epoch: int,
    host: str,
    control_address: str,
    endpoints: tuple[Endpoint, ...],
    tiers: tuple[TierCapacity, ...],
) -> Record:
    return NODE + node_id.encode(), pack([
        epoch, host, control_address,
        [[e.scheme, e.metadata, e.region] for e in endpoints],
        [[t.name, t.capacity, t.used] for t in tiers],
    ])


def decode_node(
    raw: bytes,
) -> tuple[int, str, str, tuple[Endpoint, ...], tuple[TierCapacity, ...]]:
    v = unpack(raw, "node")
    try:
        epoch, host, control, eps, tiers = v
        return (
            int(epoch), str(host), str(control),
            tuple(Endpoint(str(s), bytes(m), bytes(r)) for s, m, r in eps),
            tuple(TierCapacity(str(n), int(c), int(u)) for n, c, u in tiers),
        )
    except (TypeError, ValueError) as e:
        raise Corruption(f"master node record malformed: {v!r:.80}") from e


def meta_record(name: bytes, value: int) -> Record:
    return name, pack(value)


def decode_int(raw: bytes, what: str) -> int:
    v = unpack(raw, what)
    if isinstance(v, bool) or not isinstance(v, int):
        raise Corruption(f"master record {what} malformed: {v!r:.80}")
    return v
