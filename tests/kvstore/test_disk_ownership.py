"""One owner per disk directory; an index is moved aside only when it is corrupt."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from kvstore.errors import ConfigError, KVStoreError
from kvstore.tiers.disk import DiskTier

MiB = 1 << 20


def test_a_second_tier_on_one_directory_refuses_and_the_first_keeps_serving(tmp_path: Path) -> None:
    first = DiskTier(tmp_path, 4 * MiB, direct_io="off")
    value = np.arange(8192, dtype=np.uint8).tobytes()
    first.put(b"k", value)
    with pytest.raises(ConfigError, match="in use by another process"):
        DiskTier(tmp_path, 4 * MiB, direct_io="off")
    out = bytearray(len(value))
    first.read_into(b"k", memoryview(out))
    assert bytes(out) == value
    assert not list(tmp_path.glob("index.corrupt-*"))  # nothing was renamed aside
    first.close()
    again = DiskTier(tmp_path, 4 * MiB, direct_io="off")  # the lock goes with its owner
    again.read_into(b"k", memoryview(out))
    assert bytes(out) == value
    again.close()


def test_a_locked_index_is_an_error_never_moved_aside(tmp_path: Path) -> None:
    from rocksdict import Options, Rdict

    holder = Rdict(str(tmp_path / "index"), Options(raw_mode=True))  # someone else holds the index open
    try:
        with pytest.raises(KVStoreError, match="cannot open the index"):
            DiskTier(tmp_path, 4 * MiB, direct_io="off")
        assert not list(tmp_path.glob("index.corrupt-*"))
    finally:
        holder.close()


def test_a_corrupt_index_is_moved_aside(tmp_path: Path) -> None:
    DiskTier(tmp_path, 4 * MiB, direct_io="off").close()
    (tmp_path / "index" / "CURRENT").write_bytes(b"garbage-without-newline")
    tier = DiskTier(tmp_path, 4 * MiB, direct_io="off")
    assert tier.corrupt_on_open == 1 and len(list(tmp_path.glob("index.corrupt-*"))) == 1
    tier.close()


def test_second_node_process_on_one_disk_dir_refuses_to_start(tmp_path: Path) -> None:
    """Real processes: the second `kvstore node` on the same --disk-dir exits with a clear
    error; the first keeps serving the chunks on its disk tier."""
    from kvstore.client import Client
    from kvstore.testing.cluster import CLI, Cluster

    with Cluster(tmp_path / "c", dram="4MiB", disk="64MiB").start(nodes=1) as cl:
        with Client(cl.master_address, timeout=10) as c:
            values = {b"own-%02d" % i: bytes([i]) * MiB for i in range(8)}  # 8 MiB: most go to disk
            c.put_batch(list(values.items()))
            second = subprocess.run(
                [*CLI, "node", "--master", cl.master_address, "--node-id", "intruder", "--dram", "4MiB",
                 "--disk-dir", str(cl.workdir / "node0"), "--disk", "64MiB", "--metrics-port", "-1"],
                capture_output=True, text=True, timeout=60, env=cl.env())
            assert second.returncode != 0
            assert "in use by another process" in second.stdout + second.stderr
            time.sleep(0.5)
            assert {k: c.get(k) for k in values} == values
