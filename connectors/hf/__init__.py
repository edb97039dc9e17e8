"""transformers reference adapter: export/import a DynamicCache through kvstore (CPU tests, demo)."""

from connectors.hf.cache import export_cache, import_cache, model_namespace

__all__ = ["export_cache", "import_cache", "model_namespace"]
