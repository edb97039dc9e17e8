"""SGLang HiCache L3 storage backend over kvstore (``connectors.sglang.KVStoreHiCacheStorage``).

Importing this package needs SGLang (``pip install 'kvstore[sglang]'``); see
docs/connectors/sglang.md for the server command line.
"""

from connectors.sglang.backend import KVStoreHiCacheStorage

__all__ = ["KVStoreHiCacheStorage"]
