"""Host identity: two processes with the same id can use same-host transports (shm://)."""

from __future__ import annotations

import socket
from functools import cache
from pathlib import Path


@cache
def host_id() -> str:
    """``hostname/boot-id``: equal exactly for processes on the same running kernel."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"
