"""kvstore: KV-cache storage and transfer middleware for LLM serving."""

from kvstore.config import Config, StoreConfig, load_config
from kvstore.errors import (
    Corruption,
    InvalidArgument,
    KVStoreError,
    NoSpace,
    NotFound,
    PermissionDenied,
    Timeout,
    TransportError,
    TryAgain,
)
from kvstore.keys import Namespace, chunk_keys
from kvstore.layout import KVLayout

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "Config",
    "Corruption",
    "InvalidArgument",
    "KVLayout",
    "KVStoreError",
    "LocalStore",
    "Namespace",
    "NoSpace",
    "NotFound",
    "PermissionDenied",
    "StoreConfig",
    "Timeout",
    "TransportError",
    "TryAgain",
    "chunk_keys",
    "load_config",
]


def __getattr__(name: str) -> object:
    # LocalStore pulls in RocksDB and the clients gRPC: import them on first use only.
    if name == "LocalStore":
        from kvstore.store import LocalStore

        return LocalStore
    if name in ("Client", "AsyncClient"):
        import kvstore.client

        return getattr(kvstore.client, name)
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
