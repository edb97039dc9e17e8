"""The request/reply frame of kvstore's own TCP channels (node control, the master's framed channel).

``header`` struct ``"<4sBBHI"``: magic, version, op, flags, payload length; then
the payload. Each channel has its own magic and version (:class:`Framing`), so
a frame sent to the wrong port is refused, never misread. A reply sets
:data:`REPLY_BIT` on the op; :data:`FLAG_ERROR` marks an error reply.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("<4sBBHI")
REPLY_BIT = 0x80
FLAG_ERROR = 0x01


class Framing:
    def __init__(self, magic: bytes, version: int, what: str) -> None:
        self.magic, self.version, self.what = magic, version, what

    def pack(self, op: int, payload: bytes, flags: int = 0) -> bytes:
        return HEADER.pack(self.magic, self.version, op, flags, len(payload)) + payload

    def parse(self, raw: bytes, limit: int) -> tuple[int, int, int]:
        """``(op, flags, length)``; ValueError for a foreign frame or one over ``limit`` bytes."""
        magic, version, op, flags, length = HEADER.unpack(raw)
        if magic != self.magic or version != self.version:
            raise ValueError(f"not a v{self.version} {self.what} frame")
        if length > limit:
            raise ValueError(f"frame of {length} bytes exceeds {limit}")
        return op, flags, length
