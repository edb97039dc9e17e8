"""Corrupt bytes are detected, counted, dropped and served as misses, never as data."""

import os
import random
from pathlib import Path

from rocksdict import Options, Rdict

from kvstore import LocalStore
from kvstore.tiers.disk import decode_record

MiB = 1 << 20


def open_store(d: Path) -> LocalStore:
    return LocalStore(dram="4MiB", disk_dir=d, disk="32MiB", write_through=True, prefault=False)


def fill(d: Path, n: int = 8) -> dict[bytes, bytes]:
    vals = {b"k%d" % i: os.urandom(300_000) for i in range(n)}
    with open_store(d) as s:
        for k, v in vals.items():
            s.put(k, v)
    return vals


def index_records(d: Path) -> dict[bytes, bytes]:
    db = Rdict(str(d / "index"), Options(raw_mode=True))
    try:
        return dict(db.items())
    finally:
        db.close()


def rewrite_index(d: Path, key: bytes, value: bytes) -> None:
    db = Rdict(str(d / "index"), Options(raw_mode=True))
    db[key] = value
    db.close()


def test_flipped_data_byte_is_a_miss(disk_dir):
    vals = fill(disk_dir)
    offset, size, _ = decode_record(index_records(disk_dir)[b"k3"])
    with open(disk_dir / "chunks.dat", "r+b") as f:
        f.seek(offset + size // 2)
        b = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([b[0] ^ 0x01]))
    with open_store(disk_dir) as s:
        assert s.get(b"k3") is None
        c = s.stats()["counters"]
        assert c["misses.corrupt"] == 1 and c["corrupt.disk"] == 1
        assert not s.exists(b"k3")  # dropped
        for k, v in vals.items():
            if k != b"k3":
                assert s.get(k) == v
    assert b"k3" not in index_records(disk_dir)  # the drop is persistent


def test_flipped_index_value_is_a_miss(disk_dir):
    vals = fill(disk_dir)
    rec = bytearray(index_records(disk_dir)[b"k5"])
    rec[10] ^= 0xFF
    rewrite_index(disk_dir, b"k5", bytes(rec))
    with open_store(disk_dir) as s:
        assert s.get(b"k5") is None
        assert s.stats()["counters"]["corrupt.disk.index"] == 1
        for k, v in vals.items():
            if k != b"k5":
                assert s.get(k) == v


def test_foreign_chunk_is_a_miss(disk_dir):
    # k1's index entry now points at k2's (intact) bytes: a reused or misrouted extent.
    vals = fill(disk_dir)
    recs = index_records(disk_dir)
    db = Rdict(str(disk_dir / "index"), Options(raw_mode=True))
    db.delete(b"k2")
    db[b"k1"] = recs[b"k2"]
    db.close()
    with open_store(disk_dir) as s:
        assert s.get(b"k1") is None
        assert s.stats()["counters"]["misses.corrupt"] == 1
        assert s.get(b"k0") == vals[b"k0"]


def test_corrupt_dram_chunk_is_a_miss():
    with LocalStore(dram="4MiB", prefault=False) as s:
        s.put(b"a", b"x" * 10_000)
        s.put(b"b", b"y" * 10_000)
        lease = s._m.dram.lease(b"a")
        lease.view[5000] = ord("z")  # a stray write into the arena
        lease.release()
        assert s.get(b"a") is None and s.get_view(b"a") is None
        assert s.stats()["counters"]["corrupt.dram"] == 1
        assert s.get(b"b") == b"y" * 10_000


def test_damaged_rocksdb_files_never_serve_wrong_bytes(disk_dir):
    vals = fill(disk_dir, 16)
    rng = random.Random(7)
    for f in (disk_dir / "index").iterdir():
        if f.is_file() and f.stat().st_size > 64 and f.name != "LOCK":
            data = bytearray(f.read_bytes())
            for _ in range(8):
                i = rng.randrange(len(data))
                data[i] ^= 0xFF
            f.write_bytes(bytes(data))
    with open_store(disk_dir) as s:
        for k, v in vals.items():
            got = s.get(k)
            assert got is None or got == v
