"""A real full filesystem (a tiny tmpfs): clear NoSpace errors, store stays consistent."""

import os
import subprocess
import time

import pytest

from kvstore import KVStoreError, LocalStore, NoSpace

MiB = 1 << 20


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=True)


@pytest.mark.root
def test_preallocation_larger_than_fs_is_no_space(tiny_fs):
    with pytest.raises(NoSpace, match="cannot preallocate"):
        LocalStore(dram="1MiB", disk_dir=tiny_fs / "kv", disk="8MiB", prefault=False)


@pytest.mark.root
def test_fs_full_during_puts(tiny_fs):
    s = LocalStore(dram="1MiB", disk_dir=tiny_fs / "kv", disk="1MiB", write_through=True,
                   prefault=False)
    try:
        s.put(b"early", b"e" * 100_000, pin=True)
        # Eat the rest of the filesystem so the index (RocksDB WAL) cannot grow.
        with open(tiny_fs / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        # The data file is preallocated, so only the index can hit ENOSPC (when
        # RocksDB's preallocated WAL runs out). Either way: a put succeeds and is
        # readable, or fails with NoSpace and leaves nothing behind.
        stored = {}
        for i in range(50):
            key, value = b"k%d" % i, os.urandom(20_000)
            try:
                s.put(key, value)
                stored[key] = value
            except KVStoreError as e:
                assert isinstance(e, NoSpace), repr(e)
                assert not s._m.disk.contains(key) and not s.exists(key)
        for key, value in stored.items():
            got = s.get(key)
            assert got is None or got == value  # DRAM may have dropped it; never wrong
        assert s.get(b"early") == b"e" * 100_000
    finally:
        s.close()


@pytest.mark.root
def test_disk_tier_recovers_once_space_is_freed(tiny_fs):
    """RocksDB refuses every write after one failed for lack of space, even once space is
    back; the tier reopens its index, so puts work again as soon as the disk has room."""
    s = LocalStore(dram="1MiB", disk_dir=tiny_fs / "kv", disk="1MiB", write_through=True,
                   prefault=False)
    try:
        s.put(b"before", b"b" * 50_000)
        filler = tiny_fs / "filler"
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
        failed = 0
        for i in range(200):  # until the index's WAL cannot grow any more
            try:
                s.put(b"during-%d" % i, os.urandom(2_000))
            except KVStoreError:
                failed += 1
                break
        assert failed, "the filesystem never filled"
        filler.unlink()
        time.sleep(1.1)  # at most one reopen a second
        value = os.urandom(30_000)
        s.put(b"after", value)  # would fail forever without the reopen
        assert bytes(s.get(b"after")) == value and bytes(s.get(b"before")) == b"b" * 50_000
    finally:
        s.close()
    s = LocalStore(dram="1MiB", disk_dir=tiny_fs / "kv", disk="1MiB", prefault=False)
    try:  # and what was acknowledged is still there after a restart
        assert bytes(s.get(b"after")) == value
    finally:
        s.close()
