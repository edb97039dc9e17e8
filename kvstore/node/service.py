"""The node's control service (``kvstore.v1.Node``): translates RPCs to LocalStore calls."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import Histogram

from kvstore.errors import Corruption, InvalidArgument, NoSpace
from kvstore.node.holds import Holds
from kvstore.store import MAX_KEY_BYTES, LocalStore
from kvstore.v1 import node_pb2 as pb
from kvstore.v1 import node_pb2_grpc

log = logging.getLogger(__name__)
MAX_ITEMS = 65536


RPC_SECONDS = Histogram(
    "kvstore_node_rpc_seconds", "Node control RPC latency", ["method"], registry=None,
    buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0),
)


def _timed(fn: Callable[..., Any], name: str = "") -> Callable[..., Any]:
    hist = RPC_SECONDS.labels(name or fn.__name__)

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: Any) -> Any:
        with hist.time():
            return fn(self, request, context)

    return wrapper


class NodeService(node_pb2_grpc.NodeServicer):
    """Translates ``kvstore.v1.Node`` RPCs to LocalStore calls; every method is timed."""

    def __init__(self, store: LocalStore, holds: Holds) -> None:
        self.store = store
        self.holds = holds

    def _check_batch(self, n: int, context: Any) -> None:
        if n > MAX_ITEMS:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"batch of {n} items exceeds {MAX_ITEMS}")

    @_timed
    def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        self._check_batch(len(request.items), context)
        slots = []
        for item in request.items:
            if not 0 < len(item.key) <= MAX_KEY_BYTES or item.size == 0:
                slots.append(pb.Slot(status=pb.SLOT_INVALID))
                continue
            try:
                alloc = self.store.reserve(item.size)
            except NoSpace:
                slots.append(pb.Slot(status=pb.SLOT_NO_SPACE))
                continue
            except InvalidArgument:
                slots.append(pb.Slot(status=pb.SLOT_INVALID))
                continue
            h = self.holds.add(alloc, item.key)
            slots.append(pb.Slot(status=pb.SLOT_OK, handle=h, offset=alloc.offset, size=item.size))
        return pb.AllocateResponse(slots=slots)

    @_timed
    def Commit(self, request: pb.CommitRequest, context: Any) -> pb.CommitResponse:
        self._check_batch(len(request.items), context)
        out = []
        for item in request.items:
            hold = self.holds.take(item.handle)
            if hold is None or hold.key != item.key:
                if hold is not None:
                    hold.obj.release()
                out.append(pb.SLOT_EXPIRED)
                continue
            try:
                self.store.commit(item.key, hold.obj, item.checksum)  # type: ignore[arg-type]
                out.append(pb.SLOT_OK)
            except Corruption as e:
                log.warning("commit refused: %s", e)
                out.append(pb.SLOT_CORRUPT)
        return pb.CommitResponse(statuses=out)

    @_timed
    def Acquire(self, request: pb.AcquireRequest, context: Any) -> pb.AcquireResponse:
        self._check_batch(len(request.keys), context)
        slots = []
        for key in request.keys:
            if not 0 < len(key) <= MAX_KEY_BYTES:
                slots.append(pb.Slot(status=pb.SLOT_INVALID))
                continue
            lease = self.store.acquire(key)
            if lease is None:
                slots.append(pb.Slot(status=pb.SLOT_NOT_FOUND))
                continue
            h = self.holds.add(lease, key)
            slots.append(pb.Slot(status=pb.SLOT_OK, handle=h, offset=lease.alloc.offset,
                                 size=lease.alloc.size, checksum=lease.checksum))
        return pb.AcquireResponse(slots=slots)

    def _release(self, request: pb.HandlesRequest, context: Any) -> pb.HandlesResponse:
        self._check_batch(len(request.handles), context)
        return pb.HandlesResponse(
            statuses=[pb.SLOT_OK if self.holds.release(h) else pb.SLOT_EXPIRED for h in request.handles]
        )

    Release = _timed(_release, "Release")
    Abort = _timed(_release, "Abort")
