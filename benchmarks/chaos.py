"""Chaos harness over several seeds: wrong reads and lost acknowledged writes (must be 0).

Each seed runs a local cluster (one master with its journal, three nodes) under three
client processes while a seeded nemesis kills (-9), pauses (SIGSTOP past the node TTL)
and restarts nodes and the master and corrupts bytes in a node's arena; then the
checker reads back every acknowledged write (``kvstore.testing.chaos``).

    python benchmarks/chaos.py --seeds 20 --json bench-results/chaos.json
    python benchmarks/chaos.py --quick          # two seeds of 30 s

Not measured yet: ``failover_p50_s`` and ``availability_during_failover`` need standby
masters (etcd leader election), which are planned, not built.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import print_table, write_json  # noqa: E402

from kvstore.testing.chaos import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20, help="how many seeds (1..N)")
    ap.add_argument("--first-seed", type=int, default=1, help="first seed")
    ap.add_argument("--seconds", type=float, default=60.0, help="run time of each seed")
    ap.add_argument("--quick", action="store_true", help="two seeds of 30 s")
    ap.add_argument("--json", help="write results to this JSON file")
    args = ap.parse_args()
    seeds, seconds = (2, 30.0) if args.quick else (args.seeds, args.seconds)
    rows: list[dict[str, Any]] = []
    details: dict[int, list[str]] = {}
    for seed in range(args.first_seed, args.first_seed + seeds):
        t = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"kvchaos-{seed}-") as tmp:
            r = run(seed, Path(tmp), seconds=seconds)
        row = r.row()
        row["wall_s"] = round(time.monotonic() - t, 1)
        rows.append(row)
        details[seed] = r.details[:20]
        print(f"seed {seed}: {row['ops']} ops, faults {row['fault_kinds']}, wrong reads {row['wrong_reads']}, "
              f"lost acked writes {row['lost_acked_writes']}", flush=True)
    print_table("chaos seeds", rows, ["seed", "ops", "errors", "faults", "wrong_reads", "lost_acked_writes", "destroyed",
                       "checked", "crashes", "wall_s"])
    ratios = {"wrong_reads": sum(r["wrong_reads"] for r in rows),
              "lost_acked_writes": sum(r["lost_acked_writes"] for r in rows),
              "crashes": sum(len(r["crashes"]) for r in rows)}
    print("ratios", ratios)
    for seed, d in details.items():
        for line in d:
            print(f"  seed {seed}: {line}")
    if args.json:
        write_json(args.json, {"rows": rows, "ratios": ratios, "details": details})
    if ratios["wrong_reads"] or ratios["lost_acked_writes"] or ratios["crashes"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
