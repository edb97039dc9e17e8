"""A client process for the pool tests: mixed put/get/remove, checks every byte.

Usage: python pool_worker.py MASTER SEED OPS. Values are derived from their keys,
so any process can tell right bytes from wrong ones. Prints one JSON line of counts;
exits 1 on the first wrong byte.
"""

import hashlib
import json
import sys

import numpy as np

from kvstore.client import Client
from kvstore.errors import KVStoreError


def value_for(key: bytes) -> bytes:
    seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    return rng.bytes(int(rng.integers(1, 300_000)))


def main() -> None:
    master, seed, ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(seed)
    counts = {"put": 0, "hit": 0, "miss": 0, "remove": 0, "errors": 0}
    with Client(master, timeout=10) as c:
        for _ in range(ops):
            key = b"key-%03d" % rng.integers(0, 60)
            op = rng.integers(0, 10)
            try:
                if op < 4:
                    c.put(key, value_for(key))
                    counts["put"] += 1
                elif op < 9:
                    got = c.get(key)
                    if got is None:
                        counts["miss"] += 1
                    elif got != value_for(key):
                        print(json.dumps({"wrong_bytes": key.decode()}), flush=True)
                        sys.exit(1)
                    else:
                        counts["hit"] += 1
                else:
                    c.remove(key, force=True)
                    counts["remove"] += 1
            except KVStoreError as e:  # retryable races (busy keys) after retries
                counts["errors"] += 1
                print(f"# {type(e).__name__}: {e}", file=sys.stderr)
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
