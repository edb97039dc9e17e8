"""``AsyncClient``: the same API as :class:`Client` for asyncio code.

Each call runs the blocking client in a worker thread (``asyncio.to_thread``),
so the event loop never blocks on the network or on copies.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any

from kvstore.client.client import Client


class AsyncClient:
    def __init__(self, master: str = "127.0.0.1:5555", **kwargs: Any) -> None:
        self._client = Client(master, **kwargs)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))

    async def put(self, key: bytes | str, value: Any, **kw: Any) -> bool:
        return await self._call(self._client.put, key, value, **kw)  # type: ignore[no-any-return]

    async def put_batch(self, items: Sequence[tuple[bytes | str, Any]], **kw: Any) -> list[bool]:
        return await self._call(self._client.put_batch, items, **kw)  # type: ignore[no-any-return]

    async def get(self, key: bytes | str, **kw: Any) -> bytearray | None:
        return await self._call(self._client.get, key, **kw)  # type: ignore[no-any-return]

    async def get_into(self, key: bytes | str, buffer: Any, **kw: Any) -> int | None:
        return await self._call(self._client.get_into, key, buffer, **kw)  # type: ignore[no-any-return]

    async def get_batch(self, keys: Sequence[bytes | str], **kw: Any) -> list[bytearray | None]:
        return await self._call(self._client.get_batch, keys, **kw)  # type: ignore[no-any-return]

    async def exists(self, key: bytes | str, **kw: Any) -> bool:
        return await self._call(self._client.exists, key, **kw)  # type: ignore[no-any-return]

    async def remove(self, key: bytes | str, **kw: Any) -> bool:
        return await self._call(self._client.remove, key, **kw)  # type: ignore[no-any-return]

    async def longest_prefix(self, keys: Sequence[bytes | str], **kw: Any) -> int:
        return await self._call(self._client.longest_prefix, keys, **kw)  # type: ignore[no-any-return]

    async def close(self) -> None:
        await self._call(self._client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
