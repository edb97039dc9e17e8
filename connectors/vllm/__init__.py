"""vLLM v1 KV connector over kvstore: ``kv_connector_module_path="connectors.vllm"``.

Importing this package imports vLLM; the kvstore core never does.
"""

from connectors.vllm.connector import KVStoreConnector

__all__ = ["KVStoreConnector"]
