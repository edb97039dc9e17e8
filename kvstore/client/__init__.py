"""Client SDK for the pooled store: :class:`Client` (blocking) and :class:`AsyncClient`."""

from kvstore.client.aio import AsyncClient
from kvstore.client.client import Client

__all__ = ["AsyncClient", "Client"]
