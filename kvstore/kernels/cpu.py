"""Host backend: ``kvstore._native`` (C++, csrc/) when built.

:func:`native` imports the extension once and remembers why it failed, so the
dispatcher can fall back loudly. Native calls validate every id and size in
C++ before touching memory and release the GIL while copying; a ``ValueError``
from C++ is re-raised here as :class:`InvalidArgument` (one mapping place).
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType

import numpy as np

from kvstore.checksum import NATIVE_ABI as _ABI_VERSION
from kvstore.errors import InvalidArgument
from kvstore.kernels.paged import CopyPlan

_lock = threading.Lock()
_state: dict[str, ModuleType | str | None] = {"module": None, "error": None}


def native() -> ModuleType | None:
    """The native module, or None when it is missing or stale (see :func:`native_error`)."""
    with _lock:
        mod = _state["module"]
        if isinstance(mod, ModuleType):
            return mod
        if _state["error"] is not None:
            return None
        try:
            m = importlib.import_module("kvstore._native")
        except ImportError as e:
            _state["error"] = f"kvstore._native not importable ({e}); rebuild with `pip install -e .`"
            return None
        if getattr(m, "ABI_VERSION", None) != _ABI_VERSION:
            _state["error"] = f"kvstore._native ABI {getattr(m, 'ABI_VERSION', None)} != {_ABI_VERSION}; rebuild"
            return None
        _state["module"] = m
        return m


def native_error() -> str | None:
    """Why :func:`native` returned None (None if it did not, or was not asked yet)."""
    err = _state["error"]
    return err if isinstance(err, str) else None


def _reset_for_tests(error: str | None = None) -> None:
    """Forget the cached import; with ``error``, pretend the build is missing."""
    with _lock:
        _state["module"] = None
        _state["error"] = error


def default_threads() -> int:
    """CPUs this process may run on, capped at 8 (copies saturate memory before that)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def run_plan(
    mod: ModuleType,
    plan: CopyPlan,
    *,
    scatter: bool,
    chunk_addr: int,
    chunk_size: int,
    bases: np.ndarray,
    ids: np.ndarray,
    pos: np.ndarray | None,
    threads: int,
) -> None:
    """Run ``plan`` over layers ``bases`` (uint64) and blocks ``ids`` (int64). Blocking."""
    try:
        mod.paged_copy(
            scatter=scatter,
            chunk=chunk_addr,
            chunk_size=chunk_size,
            layer_bases=int(bases.ctypes.data),
            n_layers=len(bases),
            ids=int(ids.ctypes.data),
            pos=0 if pos is None else int(pos.ctypes.data),
            n_ids=len(ids),
            threads=threads,
            **plan.kwargs,
        )
    except ValueError as e:
        raise InvalidArgument(str(e)) from e


def copy(mod: ModuleType, dst: int, src: int, nbytes: int, threads: int) -> None:
    """Parallel memcpy between raw host addresses. Blocking; GIL released."""
    try:
        mod.copy(dst, src, nbytes, threads)
    except ValueError as e:
        raise InvalidArgument(str(e)) from e
