"""Chaos harness over several seeds: wrong reads and lost acknowledged writes (must be 0).

Each seed runs a local cluster (two masters electing a leader through a throwaway
etcd on loopback, three nodes) under three client processes while a seeded nemesis
kills (-9), pauses (SIGSTOP past the node TTL and the leader's 2 s lease) and
restarts nodes and the leading master and corrupts bytes in a node's arena; then the
checker reads back every acknowledged write (``kvstore.testing.chaos``).
``--single-master`` runs one master with its journal instead (no etcd); ``--disk`` gives
the nodes disk tiers on their own small tmpfs (root) and adds the ``fill_disk`` nemesis;
``--hosts`` (root) runs everything on three network namespaces (a master and a node on
each of two hosts, etcd, the clients and the third node on the first) and adds the
``partition`` nemesis (a host cut off the network past the node TTL and the leader's
lease, then joined again).

    python benchmarks/chaos.py --seeds 20 --json bench-results/chaos.json
    python benchmarks/chaos.py --quick          # two seeds of 30 s

``ratios``: ``wrong_reads`` and ``lost_acked_writes`` (must be 0), ``crashes``,
``failover_p50_s`` (fault of the leader -> a fresh client answered by the new leader;
goal <= 5) and ``availability_during_failover`` (share of the clients' operations
started in those windows that succeeded within their 3 s deadline).
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

from kvstore.testing.chaos import run, run_on_hosts  # noqa: E402
from kvstore.testing.etcd import EtcdServer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20, help="how many seeds (1..N)")
    ap.add_argument("--first-seed", type=int, default=1, help="first seed")
    ap.add_argument("--seconds", type=float, default=60.0, help="run time of each seed")
    ap.add_argument("--quick", action="store_true", help="two seeds of 30 s")
    ap.add_argument("--disk", action="store_true",
                    help="nodes with disk tiers on small tmpfs mounts (root) and the fill_disk nemesis")
    ap.add_argument("--single-master", action="store_true",
                    help="one master with its journal instead of two electing a leader through etcd")
    ap.add_argument("--hosts", action="store_true",
                    help="processes on three network namespaces (root) and the partition nemesis")
    ap.add_argument("--json", help="write results to this JSON file")
    args = ap.parse_args()
    seeds, seconds = (2, 30.0) if args.quick else (args.seeds, args.seconds)
    rows: list[dict[str, Any]] = []
    details: dict[int, list[str]] = {}
    failovers: list[float] = []
    window_ops = window_ok = 0
    for seed in range(args.first_seed, args.first_seed + seeds):
        t = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"kvchaos-{seed}-") as tmp:
            if args.hosts:
                if args.disk or args.single_master:
                    ap.error("--hosts runs two masters with DRAM-only nodes (no --disk, --single-master)")
                r = run_on_hosts(seed, Path(tmp), seconds=seconds)
            elif args.single_master:
                r = run(seed, Path(tmp), seconds=seconds, disk=args.disk)
            else:
                with EtcdServer(Path(tmp) / "etcd") as etcd:
                    r = run(seed, Path(tmp) / "cluster", seconds=seconds, etcd=etcd.endpoint, disk=args.disk)
        row = r.row()
        failovers += r.failovers
        window_ops, window_ok = window_ops + r.failover_ops, window_ok + r.failover_ok
        row["wall_s"] = round(time.monotonic() - t, 1)
        rows.append(row)
        details[seed] = r.details[:20]
        print(f"seed {seed}: {row['ops']} ops, faults {row['fault_kinds']}, wrong reads {row['wrong_reads']}, "
              f"lost acked writes {row['lost_acked_writes']}, failovers {row['failovers_s']}", flush=True)
    print_table("chaos seeds", rows, ["seed", "ops", "errors", "faults", "wrong_reads", "lost_acked_writes", "destroyed",
                       "checked", "crashes", "failovers_s", "availability_during_failover", "wall_s"])
    ratios: dict[str, Any] = {"wrong_reads": sum(r["wrong_reads"] for r in rows),
                              "lost_acked_writes": sum(r["lost_acked_writes"] for r in rows),
                              "crashes": sum(len(r["crashes"]) for r in rows),
                              "leaks": sum(len(r["leaks"]) for r in rows)}
    if failovers:
        ratios["failover_p50_s"] = round(sorted(failovers)[len(failovers) // 2], 2)
        ratios["failover_max_s"] = round(max(failovers), 2)
        ratios["availability_during_failover"] = round(window_ok / window_ops, 3) if window_ops else None
    print("ratios", ratios)
    for seed, d in details.items():
        for line in d:
            print(f"  seed {seed}: {line}")
    if args.json:
        write_json(args.json, {"rows": rows, "ratios": ratios, "details": details})
    if ratios["wrong_reads"] or ratios["lost_acked_writes"] or ratios["crashes"] or ratios["leaks"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
