"""Host identity: two processes with the same id can use same-host transports (shm://)."""

from __future__ import annotations

import ipaddress
import os
import socket
from functools import cache
from pathlib import Path


@cache
def host_id() -> str:
    """``hostname/boot-id/netns``: equal exactly for processes on the same running kernel
    in the same network namespace (``shm://`` meets its peers on an abstract Unix socket,
    which does not cross network namespaces: containers on one kernel are different hosts)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    try:
        netns = f"/net:{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        netns = ""
    return f"{socket.gethostname()}/{boot}{netns}"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a listener on this machine (protected mode's test);
    a host name other than ``localhost`` may resolve to anything, so it is not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
