"""Content-addressed chunk keys, identical in every process and on every host.

::

    root    = SHA-256(canonical namespace)
    key_i   = SHA-256(key_{i-1} || token ids of chunk i as little-endian uint32)

The namespace holds everything that makes two caches incompatible: model
identity, the KV layout fingerprint, the tensor-parallel shard and the tenant's
cache salt. Two requests sharing a token prefix share the keys of its full
chunks; any namespace difference gives disjoint keys. Python's ``hash()`` is
never used (it is salted per process).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.errors import InvalidArgument
from kvstore.layout import KVLayout

MAX_KEY_BYTES = 256
Key = bytes | str


def check_key(key: Any) -> bytes:
    """Normalize a key to bytes, or raise :class:`InvalidArgument` saying why."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    elif isinstance(key, (bytearray, memoryview)):
        key = bytes(key)
    if not isinstance(key, bytes):
        raise InvalidArgument(f"key must be bytes or str, got {type(key).__name__}")
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise InvalidArgument(f"key must be 1..{MAX_KEY_BYTES} bytes long, got {len(key)}")
    return key


KEY_BYTES = 32
"""Length of a chunk key (a SHA-256 digest)."""
MAX_TOKEN_ID = 2**32 - 1


@dataclass(frozen=True)
class Namespace:
    """Everything that must match for two engines to share KV chunks."""

    model: str
    """Model identity (name plus revision/quantization as the engine reports it)."""
    layout: KVLayout
    """Shape and dtype of the shard's cache; its fingerprint enters the root."""
    tp_rank: int = 0
    tp_size: int = 1
    cache_salt: str = ""
    """Per-tenant salt: tenants with different salts never see each other's KV."""

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidArgument("Namespace.model must be a non-empty string")
        if not (0 <= self.tp_rank < self.tp_size):
            raise InvalidArgument(
                f"Namespace: tp_rank {self.tp_rank} out of range for tp_size {self.tp_size}"
            )

    def root(self) -> bytes:
        """SHA-256 of the canonical, length-prefixed encoding of the namespace."""
        h = hashlib.sha256(b"kvstore-namespace-v1\x00")
        for field in (
            self.model,
            self.layout.fingerprint(),
            str(self.tp_rank),
            str(self.tp_size),
            self.cache_salt,
        ):
            raw = field.encode("utf-8")
            h.update(struct.pack("<I", len(raw)))
            h.update(raw)
        return h.digest()

    @property
    def chunk_tokens(self) -> int:
        return self.layout.chunk_tokens


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise InvalidArgument(f"token ids must be a flat sequence, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if arr.dtype.kind not in "iu":
        raise InvalidArgument(f"token ids must be integers, got dtype {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID:
        raise InvalidArgument(f"token ids must lie in [0, {MAX_TOKEN_ID}]")
    return arr.astype("<u4", copy=False).tobytes()


def chunk_keys(
    namespace: Namespace,
    tokens: Sequence[int] | np.ndarray,
    *,
    include_partial: bool = False,
    parent: bytes | None = None,
    extras: Sequence[bytes] | None = None,
) -> list[bytes]:
    """Keys of the chunks of ``tokens``.

    Only full chunks get keys unless ``include_partial`` (a partial chunk's key
    also commits to its length, so it never collides with a longer chunk).
    ``parent`` continues a chain: pass the last key of the preceding chunks.
    ``extras[i]`` (when given and non-empty) is more identity of full chunk ``i``
    than its token ids: a digest of the multimodal items, adapter or embeddings
    that produced its KV (:func:`extra_digest`). Chunks past ``len(extras)`` and
    empty entries key on their tokens alone.
    """
    raw = _token_bytes(tokens)
    step = namespace.chunk_tokens * 4
    prev = namespace.root() if parent is None else _check_parent(parent)
    keys: list[bytes] = []
    full_end = len(raw) - len(raw) % step
    for i, off in enumerate(range(0, full_end, step)):
        extra = extras[i] if extras is not None and i < len(extras) else b""
        if extra:
            prev = hashlib.sha256(prev + raw[off : off + step] + _EXTRA_TAG + struct.pack("<I", len(extra))
                                  + extra).digest()
        else:
            prev = hashlib.sha256(prev + raw[off : off + step]).digest()
        keys.append(prev)
    if include_partial and full_end < len(raw):
        tail = raw[full_end:]
        prev = hashlib.sha256(prev + tail + struct.pack("<I", len(tail) // 4)).digest()
        keys.append(prev)
    return keys


_EXTRA_TAG = b"\x00kvstore-extra\x00"


def extra_digest(items: Sequence[Any] | None) -> bytes:
    """A chunk's extra identity: SHA-256 of a canonical encoding of ``items`` (nested
    tuples/lists of str, bytes, int, bool and None), or ``b""`` for none. Never
    Python's ``hash()`` or pickle: the same items give the same digest everywhere."""
    if not items:
        return b""
    h = hashlib.sha256(b"kvstore-extra-v1\x00")
    _encode(h, items)
    return h.digest()


def _encode(h: Any, v: Any) -> None:
    if v is None:
        h.update(b"N")
    elif isinstance(v, bool):
        h.update(b"T" if v else b"F")
    elif isinstance(v, int):
        raw = str(v).encode()
        h.update(b"I" + struct.pack("<I", len(raw)) + raw)
    elif isinstance(v, str):
        raw = v.encode("utf-8")
        h.update(b"S" + struct.pack("<I", len(raw)) + raw)
    elif isinstance(v, (bytes, bytearray, memoryview)):
        raw = bytes(v)
        h.update(b"B" + struct.pack("<I", len(raw)) + raw)
    elif isinstance(v, (tuple, list)):
        h.update(b"L" + struct.pack("<I", len(v)))
        for x in v:
            _encode(h, x)
    else:
        raise InvalidArgument(f"extra identity items must be str, bytes, int, bool, None or "
                              f"sequences of them, got {type(v).__name__}")


def key_hex(key: bytes) -> str:
    """Short printable form of a key for logs and tables."""
    return key.hex()[:16]


def _check_parent(parent: bytes) -> bytes:
    if not isinstance(parent, bytes) or len(parent) != KEY_BYTES:
        raise InvalidArgument(f"parent key must be {KEY_BYTES} bytes")
    return parent

