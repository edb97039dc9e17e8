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
    # LocalStore pulls in RocksDB; import it on first use only.
    if name == "LocalStore":
        from kvstore.store import LocalStore

        return LocalStore
    raise AttributeError(name)
