"""One short seed of the chaos harness (kvstore.testing.chaos): real processes killed,
paused and corrupted under three clients; no wrong read, no lost acknowledged write.
The long run: ``make chaos SEEDS=20``."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.testing.chaos import run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [2])  # seed 2 draws every nemesis: node kill and pause, master kill
def test_chaos_short_seed(seed: int, tmp_path: Path) -> None:  # and pause, arena corruption
    r = run(seed, tmp_path, seconds=40)
    row = r.row()
    assert set(row["fault_kinds"]) == {"kill_node", "pause_node", "kill_master", "pause_master", "corrupt"}
    assert r.wrong_reads == 0, r.details
    assert r.lost_acked_writes == 0, r.details
    assert r.crashes == [], r.crashes
    assert sum(r.ops.values()) > 1000 and r.checked > 50
