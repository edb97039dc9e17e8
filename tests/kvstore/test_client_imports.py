"""The client SDK stays light: importing it loads no storage engine."""

import subprocess
import sys


def test_client_import_loads_no_storage_engine():
    """... and no CUDA library: CuPy loads when CUDA memory is first given (docs/gpu.md)."""
    code = ("import sys, kvstore.client; "
            "bad = [m for m in sys.modules if m in ('rocksdict', 'cupy', 'torch') "
            "or m.startswith(('kvstore.tiers', 'kvstore.store'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_async_client_offers_every_client_call():
    """AsyncClient has a coroutine for each public Client call (the event stream as an
    async iterator)."""
    import inspect

    from kvstore.client import AsyncClient, Client

    calls = {n for n, f in inspect.getmembers(Client, inspect.isfunction) if not n.startswith("_")}
    missing = calls - {n for n in dir(AsyncClient) if not n.startswith("_")}
    assert not missing, missing
    for n in calls - {"watch_events"}:
        assert inspect.iscoroutinefunction(getattr(AsyncClient, n)), n
    assert inspect.isasyncgenfunction(AsyncClient.watch_events)
