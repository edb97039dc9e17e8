"""Wire format of the node control channel (client <-> node), and its status codes.

Every call is batched; results come back in request order. Bytes never travel
here: a put is ALLOCATE -> the client writes into the node's registered arena
through the transfer engine -> COMMIT (the node verifies the checksum); a get
is ACQUIRE -> the client reads -> RELEASE, or over the network one FETCH whose
reply carries the bytes after the frame; a put over the network is one STORE
whose request carries the bytes after the frame (the node allocates, receives
straight into the arena, verifies and commits). A same-host client that knows a
chunk's location (offset and extent generation, from ALLOCATE or ACQUIRE) reads
it one-sided out of the mapped arena instead, checking the node's generation
table (MAPS) around the copy (docs/design/hot-path.md).

Frame (both directions)::

    header  struct "<4sBBHI": magic b"KVNC", version, op, flags, payload length
    payload msgpack array of items (requests) or results (replies)

A reply carries the request's op with :data:`REPLY_BIT` set; an error reply
sets :data:`FLAG_ERROR` and its payload is a message string. Limits are checked
before anything is allocated: a frame over :data:`MAX_FRAME` or a batch over
:data:`MAX_ITEMS` is refused and the connection closed. No pickle: msgpack of
ints and bytes only.

A client opens every connection with AUTH: its token (when the node requires
one: then nothing else is served before it, and frames before it are capped at
:data:`MAX_PREAUTH_FRAME`) and a random session id shared by all its connections.
Handles are random 63-bit numbers bound to the session that got them: another
session cannot COMMIT, ABORT or RELEASE them.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from kvstore.framing import Framing

MAGIC = b"KVNC"
VERSION = 2
FRAMING = Framing(MAGIC, VERSION, "node control")
MAX_FRAME = 64 << 20
MAX_ITEMS = 65536


class Op(enum.IntEnum):
    ALLOCATE = 1  # items: [key, size]          -> Allocated
    COMMIT = 2  # items: [handle, key, checksum]  -> status
    ABORT = 3  # items: handle                    -> status
    ACQUIRE = 4  # items: key                     -> Acquired
    RELEASE = 5  # items: handle                  -> status
    MAPS = 6  # items: scheme                     -> Maps
    REMOVE = 7  # items: key                      -> status (OK or NOT_FOUND)
    FETCH = 8  # items: [key, checksum(, ranges)] -> Fetched, then the bytes of each OK item
    STORE = 9  # items: [key, size, checksum or nil], then the bytes of each item -> Stored (committed)
    AUTH = 10  # items: [token or None, session id (16 random bytes)] -> status; first on a connection


MAX_PREAUTH_FRAME = 4096
"""Largest frame a connection may send before it authenticated (an AUTH is ~100 bytes)."""


class Fetched(NamedTuple):
    """FETCH result: the value's size, checksum and block sums. The bytes of every OK
    item follow the reply frame back to back, in request order (one round trip, no
    hold): the whole value, or with ``ranges`` ([[offset, length], ...]) the blocks
    each range touches (kvstore.checksum.covering), so the reader can verify them."""

    status: int
    size: int = 0
    checksum: int = 0
    sums: bytes = b""


class Allocated(NamedTuple):
    """ALLOCATE result: where to write, and the extent generation of that space."""

    status: int
    handle: int = 0
    offset: int = 0
    generation: int = 0


class Stored(NamedTuple):
    """STORE result: where the value went (as :class:`Allocated`; no handle), and the
    checksum of the bytes that landed."""

    status: int
    handle: int = 0
    offset: int = 0
    generation: int = 0
    checksum: int = 0


class Acquired(NamedTuple):
    """ACQUIRE result: the held chunk's place in the arena, its checksum and generation."""

    status: int
    handle: int = 0
    offset: int = 0
    size: int = 0
    checksum: int = 0
    generation: int = 0
    sums: bytes = b""
    """Block sums, little-endian uint64 (kvstore.checksum): for verifying partial reads."""


class Maps(NamedTuple):
    """MAPS result for a transport scheme whose memory same-host peers map: the
    node's extent-generation table (a RemoteRegion descriptor) and its granule."""

    status: int
    generations: bytes = b""
    granule: int = 0


class SlotStatus(enum.IntEnum):
    OK = 1
    NOT_FOUND = 2  # ACQUIRE: the node does not hold the key
    NO_SPACE = 3  # ALLOCATE: nothing evictable makes room
    CORRUPT = 4  # COMMIT: the bytes that landed do not match the checksum
    EXPIRED = 5  # COMMIT/RELEASE/ABORT: unknown or reclaimed handle
    INVALID = 6  # malformed item (empty or long key, size 0, too big)
    DENIED = 7  # AUTH: the token is not one this node accepts
    BUSY = 8  # ALLOCATE/ACQUIRE: this client holds too many handles already


pack_frame = FRAMING.pack


def parse_header(raw: bytes) -> tuple[int, int, int]:
    """``(op, flags, length)``; raises ValueError for a foreign or oversize frame."""
    return FRAMING.parse(raw, MAX_FRAME)
