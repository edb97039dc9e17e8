"""Shared type aliases."""

from __future__ import annotations

from typing import TypeAlias

# Anything exposing the buffer protocol that kvstore accepts for chunk bytes.
# (collections.abc.Buffer is Python 3.12+.)
Buffer: TypeAlias = bytes | bytearray | memoryview
