"""Child process for the crash test: writes chunks and acknowledges each durable put.

Usage: python crash_writer.py DIR ROUND. Prints "ACK <hex key>" after each put
returns (write-through: the bytes and index are synced), then keeps going until
it is killed with SIGKILL.
"""

import sys

from kvstore import LocalStore


def value_for(key: bytes) -> bytes:
    import numpy as np

    seed = int.from_bytes(key[:8].ljust(8, b"\0"), "little")
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 65_536))
    return rng.bytes(size)


def main() -> None:
    directory, rnd = sys.argv[1], int(sys.argv[2])
    store = LocalStore(dram="8MiB", disk_dir=directory, disk="512MiB", write_through=True, prefault=False)
    i = 0
    while True:
        key = b"r%03d-%06d" % (rnd, i)
        store.put(key, value_for(key))
        print("ACK", key.hex(), flush=True)
        if i % 7 == 3:  # overwrite an older key with its own content
            old = b"r%03d-%06d" % (rnd, i // 2)
            store.put(old, value_for(old))
        i += 1


if __name__ == "__main__":
    main()
