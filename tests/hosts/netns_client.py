"""A client on one of the test's network-namespace hosts (run with ``ip netns exec``).

``netns_client.py MASTER TOKEN_FILE put PREFIX N``: put N values (2 replicas) and read
them back; ``... check PREFIX N``: read N values back with a fresh client (no cached
locations: every read asks the master); ``... nodes - N``: wait (60 s at most) until N
nodes are registered. Prints one JSON line: ok / wrong / missing
counts, the client's counters and the seconds it took.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def value(key: bytes) -> bytes:
    return (key * (300_000 // len(key) + 1))[:300_000]


def main() -> None:
    from kvstore.client import Client

    master, token_file, mode, prefix, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    token = Path(token_file).read_text().strip()
    keys = [f"{prefix}-{i:03d}".encode() for i in range(n)]
    t = time.monotonic()
    with Client(master, token=token, timeout=30, replicas=2) as c:
        if mode == "nodes":
            while len(c.stats().nodes) < n and time.monotonic() - t < 60:
                time.sleep(0.2)
            print(json.dumps({"nodes": len(c.stats().nodes)}), flush=True)
            return
        if mode == "put":
            c.put_batch([(k, value(k)) for k in keys])
        got = c.get_batch(keys)
        counters = dict(c.counters)
    out = {"ok": sum(g is not None and bytes(g) == value(k) for g, k in zip(got, keys, strict=True)),
           "wrong": sum(g is not None and bytes(g) != value(k) for g, k in zip(got, keys, strict=True)),
           "missing": sum(g is None for g in got), "counters": counters, "seconds": time.monotonic() - t}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
