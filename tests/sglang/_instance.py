"""A second SGLang "instance" in its own process: reads pages another process stored.

    python tests/sglang/_instance.py MASTER MODEL TP_RANK TP_SIZE LAYOUT KEYS_JSON

Prints one JSON line: pages found by batch_exists and the sha256 of each page read.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

import pools  # noqa: E402


def main() -> None:
    master, model, tp_rank, tp_size, layout, keys_json = sys.argv[1:7]
    keys = json.loads(keys_json)
    host = pools.mha_host(layout)
    be = pools.backend(master, host, model=model, tp_rank=int(tp_rank), tp_size=int(tp_size))
    found = be.batch_exists(keys)
    idx = host.alloc(len(keys) * host.page_size)
    ok = be.batch_get_v1(keys, idx)
    pages = [hashlib.sha256(pools.page_bytes(host, idx, i)).hexdigest() for i in range(len(keys))]
    print(json.dumps({"found": found, "ok": ok, "pages": pages}))
    be.close()


if __name__ == "__main__":
    main()
