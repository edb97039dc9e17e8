"""Protobuf <-> :mod:`kvstore.master.types`, for the servicer (field by field, no logic)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import cast

from kvstore.master.types import (
    Endpoint,
    HeldKey,
    LookupResult,
    Node,
    PutItem,
    PutStartResult,
    Stats,
    Status,
    TierCapacity,
)
from kvstore.v1 import master_pb2 as pb


def endpoints_in(eps: Iterable[pb.Endpoint]) -> list[Endpoint]:
    return [Endpoint(e.scheme, e.metadata, e.region) for e in eps]


def tiers_in(tiers: Iterable[pb.TierCapacity]) -> list[TierCapacity]:
    return [TierCapacity(t.name, t.capacity, t.used) for t in tiers]


def held_in(held: Iterable[pb.HeldKey]) -> list[HeldKey]:
    return [HeldKey(h.key, h.size, h.checksum) for h in held]


def items_in(items: Iterable[pb.PutItem]) -> list[PutItem]:
    return [PutItem(i.key, i.size, i.checksum, i.checksum_at_end) for i in items]


def node_info(n: Node) -> pb.NodeInfo:
    return pb.NodeInfo(
        node_id=n.node_id, epoch=n.epoch, host=n.host, control_address=n.control_address,
        endpoints=[pb.Endpoint(scheme=e.scheme, metadata=e.metadata, region=e.region)
                   for e in n.endpoints],
        tiers=[pb.TierCapacity(name=t.name, capacity=t.capacity, used=t.used) for t in n.tiers],
        objects=n.objects, assigned_bytes=max(0, n.assigned_bytes),
        last_heartbeat_ms=n.last_heartbeat_ms,
    )


# A node's NodeInfo is built once per response and copied into every place it appears.


def put_start_out(r: PutStartResult) -> pb.PutStartResponse:
    infos: dict[str, pb.NodeInfo] = {}
    resp = pb.PutStartResponse(put_id=r.put_id, expires_ms=r.expires_ms)
    for p in r.placements:
        out = resp.placements.add(status=p.status)
        for n in p.nodes:
            out.nodes.append(_cached(infos, n))
    return resp

def lookup_out(r: LookupResult) -> pb.LookupResponse:
    infos: dict[str, pb.NodeInfo] = {}
    resp = pb.LookupResponse(lease_id=r.lease_id, lease_expires_ms=r.lease_expires_ms)
    for loc in r.locations:
        out = resp.locations.add(status=loc.status, size=loc.size, checksum=loc.checksum)
        for n in loc.nodes:
            out.nodes.append(_cached(infos, n))
    return resp

def stats_out(s: Stats) -> pb.StatsResponse:
    return pb.StatsResponse(
        nodes=[node_info(n) for n in s.nodes], objects=s.objects, pending=s.pending,
        bytes=s.bytes, leases=s.leases, pins=s.pins, counters=s.counters)


def _cached(infos: dict[str, pb.NodeInfo], n: Node) -> pb.NodeInfo:
    info = infos.get(n.node_id)
    if info is None:
        info = infos[n.node_id] = node_info(n)
    return info


def statuses_out(st: Sequence[Status]) -> list[pb.ItemStatus]:
    """Per-item statuses (their numbers are the protobuf ``ItemStatus`` numbers)."""
    return cast("list[pb.ItemStatus]", st)
