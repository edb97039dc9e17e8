"""The process-wide ucxx context and the event-loop thread that drives it.

ucxx keeps one UCX context and worker per process, progressed from an asyncio
loop; every ``UcxTransport`` in the process shares this loop thread and posts
coroutines to it. UCX reads its settings from the environment once, at the
first use; :func:`ensure` fills in defaults measured on loopback (TCP segment
sizes of 4 MiB roughly triple TCP throughput) unless the caller already set them.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from kvstore.errors import InvalidArgument

DEFAULT_ENV = {
    "UCX_TCP_TX_SEG_SIZE": "4m",
    "UCX_TCP_RX_SEG_SIZE": "4m",
}

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def ucxx_module() -> Any:
    """Import ucxx or fail with what to install."""
    try:
        import ucxx  # noqa: PLC0415
    except ImportError as e:
        raise InvalidArgument(
            "ucx:// needs ucxx: pip install 'kvstore[ucx]' (ucxx-cu12); "
            f"or use tcp:// / shm:// ({e})"
        ) from e
    return ucxx


def ensure() -> asyncio.AbstractEventLoop:
    """Start (once) the loop thread with UCX initialised on it; returns the loop."""
    global _loop
    with _lock:
        if _loop is not None:
            return _loop
        for k, v in DEFAULT_ENV.items():
            os.environ.setdefault(k, v)
        ucxx = ucxx_module()
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        threading.Thread(target=run, name="ucx-loop", daemon=True).start()
        ready.wait()

        async def init() -> None:
            ucxx.init()
            ucxx.continuous_ucx_progress()

        asyncio.run_coroutine_threadsafe(init(), loop).result(60)
        _loop = loop
        return loop
