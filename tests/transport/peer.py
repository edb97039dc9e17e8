"""A transport peer in its own process, driven over stdin/stdout by the tests.

Usage: ``python tests/transport/peer.py URI NBYTES`` (with the repo on PYTHONPATH). Prints one line
``<metadata hex> <remote region hex> <pid>`` then serves, answering commands:

    sum OFF LEN          -> XXH3 checksum of the region's range (decimal)
    fill / zero          -> refill with the test pattern / zero the region; "ok"
    wait HEX SECONDS     -> wait for notification HEX; "ok" or "timeout"
    layers HEX N SECONDS -> wait layers 0..N-1 of layer stream HEX in order; "ok" or "timeout"
"""

from __future__ import annotations

import sys

import numpy as np

from kvstore.checksum import checksum
from kvstore.errors import Timeout
from transport.layerwise import LayerReceiver
from transport.registry import create


def pattern(n: int, salt: int = 0) -> np.ndarray:
    return np.resize((np.arange(251, dtype=np.uint8) + salt).astype(np.uint8), n)


def main() -> None:
    uri, nbytes = sys.argv[1], int(sys.argv[2])
    t = create(uri)
    region = t.allocate(nbytes, name="peer")
    assert region.view is not None
    arr = np.frombuffer(region.view, dtype=np.uint8)
    arr[:] = pattern(nbytes)
    print(t.metadata().hex(), region.remote().to_bytes().hex(), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        try:
            if cmd[0] == "sum":
                off, n = int(cmd[1]), int(cmd[2])
                print(checksum(region.view[off : off + n]), flush=True)
            elif cmd[0] == "fill":
                arr[:] = pattern(nbytes)
                print("ok", flush=True)
            elif cmd[0] == "zero":
                arr[:] = 0
                print("ok", flush=True)
            elif cmd[0] == "wait":
                t.notifications.wait_for(bytes.fromhex(cmd[1]), float(cmd[2]))
                print("ok", flush=True)
            elif cmd[0] == "layers":
                rx = LayerReceiver(t, bytes.fromhex(cmd[1]), int(cmd[2]))
                for layer in range(int(cmd[2])):
                    rx.wait_layer(layer, float(cmd[3]))
                print("ok", flush=True)
        except Timeout:
            print("timeout", flush=True)
    t.close()


if __name__ == "__main__":
    main()
