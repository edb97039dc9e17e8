"""Node daemon configuration lives with the rest in :mod:`kvstore.config`."""

from kvstore.config import NodeConfig

__all__ = ["NodeConfig"]
