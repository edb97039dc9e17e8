"""The metadata master: where every chunk lives (the master never touches data).

* :mod:`kvstore.master.state` — :class:`MasterState`, the sans-I/O state machine;
* :mod:`kvstore.master.persist` — RocksDB persistence of its journal;
* :mod:`kvstore.master.server` — the ``grpc.aio`` servicer and :func:`serve_master`;
* :mod:`kvstore.master.errors` — gRPC status codes mapped to :mod:`kvstore.errors`.

Importing this package does not import grpc; import the submodules you need.
"""

from kvstore.master.state import MasterState
from kvstore.master.types import (
    Endpoint,
    HeldKey,
    Node,
    PutItem,
    Status,
    TierCapacity,
)

__all__ = ["Endpoint", "HeldKey", "MasterState", "Node", "PutItem", "Status", "TierCapacity"]
