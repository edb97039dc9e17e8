"""Shared type aliases."""

from __future__ import annotations

from typing import Any, TypeAlias

from kvstore.errors import InvalidArgument

# Anything exposing the buffer protocol that kvstore accepts for chunk bytes.
# (collections.abc.Buffer is Python 3.12+.)
Buffer: TypeAlias = bytes | bytearray | memoryview


def byte_view(buf: Any, what: str = "value") -> memoryview:
    """Flat unsigned-byte view of a C-contiguous buffer (no copy); InvalidArgument otherwise."""
    try:
        mv = memoryview(buf)
    except TypeError as e:
        raise InvalidArgument(f"{what} must support the buffer protocol, got {type(buf).__name__}") from e
    if not mv.c_contiguous:
        raise InvalidArgument(f"{what} must be C-contiguous")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
