"""Disk (NVMe) tier: chunk data in one preallocated file, index in RocksDB.

Layout under ``directory``::

    chunks.dat   preallocated to ``capacity``; chunks live in aligned extents
    index/       RocksDB (raw mode): key -> IndexRecord (offset, size, checksum)

A put writes the data (``O_DIRECT`` where the filesystem allows it), makes it
durable (``fdatasync``), and only then writes the index record (synced WAL):
a chunk is never visible before its bytes are on disk. The record carries its
own checksum and the data checksum is seeded by the key, so a torn index value,
a reused extent or a flipped data byte is detected and served as a miss. Free
space is not persisted: it is the complement of the index, rebuilt on open.

Removal deletes the index record without syncing: if a crash resurrects it,
its extent may since hold other bytes, which fail verification (a miss).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import xxhash
from rocksdict import Options, Rdict, WriteOptions

from kvstore._types import Buffer
from kvstore.checksum import checksum as compute_checksum
from kvstore.checksum import copy_hashed, copy_verified, verify
from kvstore.errors import (
    ConfigError,
    Corruption,
    InvalidArgument,
    KVStoreError,
    NoSpace,
    NotFound,
    from_errno,
)
from kvstore.memory import ExtentAllocator, aligned_buffer
from kvstore.tiers.base import Entry, Tier, TierCapabilities
from kvstore.units import format_size

log = logging.getLogger(__name__)

_RECORD = struct.Struct("<4sIQQQ")
_MAGIC = b"KVI1"


def encode_record(offset: int, size: int, checksum: int) -> bytes:
    body = _RECORD.pack(_MAGIC, 0, offset, size, checksum)
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def decode_record(raw: bytes) -> tuple[int, int, int]:
    """``(offset, size, checksum)``; raises :class:`Corruption` on a damaged record."""
    if len(raw) != _RECORD.size + 8:
        raise Corruption(f"index record has {len(raw)} bytes, expected {_RECORD.size + 8}")
    body, (crc,) = raw[: _RECORD.size], struct.unpack("<Q", raw[_RECORD.size :])
    if xxhash.xxh3_64_intdigest(body) != crc:
        raise Corruption("index record checksum mismatch")
    magic, _flags, offset, size, checksum = _RECORD.unpack(body)
    if magic != _MAGIC:
        raise Corruption(f"index record has bad magic {magic!r}")
    return offset, size, checksum


class DiskTier(Tier):
    capabilities = TierCapabilities(persistent=True, zero_copy=False, medium="disk")

    def __init__(
        self,
        directory: str | Path,
        capacity: int,
        *,
        alignment: int = 4096,
        direct_io: str = "auto",
        sync: bool = True,
        name: str = "disk",
    ) -> None:
        self.name = name
        self.directory = Path(directory)
        self.sync = sync
        self._lock = threading.Lock()
        self._alloc = ExtentAllocator(capacity, alignment)
        self._entries: dict[bytes, tuple[int, int, int]] = {}
        self._local = threading.local()
        self.corrupt_on_open = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._path = self.directory / "chunks.dat"
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise from_errno(e, f"{name}: cannot open data file under {self.directory}") from e
        try:  # one owner per directory: a second node here would write into the same extents
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            raise ConfigError(
                f"{name}: {self.directory} is in use by another process (its data file is locked); "
                "give each node its own store.disk_dir") from e
        try:
            self._preallocate(self._alloc.capacity)
            self._dfd, self.direct = self._open_direct(direct_io)
            self._wopts = WriteOptions()
            self._wopts.sync = sync
            self._ilock = threading.Lock()  # index writes vs. reopening it
            self._reopened_at = 0.0
            self.index_reopens = 0
            self._db = self._open_index()
            self._load_index()
        except BaseException:
            os.close(self._fd)
            raise

    # -- set-up ------------------------------------------------------------

    def _preallocate(self, nbytes: int) -> None:
        have = os.fstat(self._fd).st_size
        if have >= nbytes:
            return
        try:
            os.posix_fallocate(self._fd, have, nbytes - have)
        except OSError as e:
            free = shutil.disk_usage(self.directory).free
            raise NoSpace(
                f"{self.name}: cannot preallocate {format_size(nbytes)} under {self.directory} "
                f"({format_size(free)} free): {e.strerror}; lower store.disk or free space"
            ) from e

    def _open_direct(self, mode: str) -> tuple[int, bool]:
        if mode == "off" or not hasattr(os, "O_DIRECT"):
            return self._fd, False
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_DIRECT)
            probe = aligned_buffer(self._alloc.alignment, self._alloc.alignment)
            os.preadv(fd, [probe.data], 0)
            return fd, True
        except OSError as e:
            if "fd" in locals():
                os.close(fd)
            if mode == "on":
                raise InvalidArgument(
                    f"{self.name}: store.disk_direct_io='on' but O_DIRECT fails under "
                    f"{self.directory}: {e.strerror}"
                ) from e
            log.warning("%s: O_DIRECT unavailable under %s (%s); using buffered I/O",
                        self.name, self.directory, e.strerror)
            return self._fd, False

    def _open_index(self) -> Rdict:
        path = str(self.directory / "index")
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        try:
            return Rdict(path, opts)
        except Exception as e:  # noqa: BLE001 - rocksdict raises bare Exception on corruption
            if "Corruption" not in str(e):  # a lock or an I/O error: the index may be fine, never move it
                raise KVStoreError(f"{self.name}: cannot open the index under {self.directory}: {e}") from e
            # A damaged index cannot vouch for any chunk: keep it aside, start empty.
            aside = f"{path}.corrupt-{int(time.time())}"
            log.error("%s: index unreadable (%s); moved to %s, starting empty", self.name, e, aside)
            os.rename(path, aside)
            self.corrupt_on_open += 1
            return Rdict(path, opts)

    def _load_index(self) -> None:
        bad: list[bytes] = []
        for k, v in self._db.items():
            key, raw = cast(bytes, k), cast(bytes, v)
            try:
                offset, size, checksum = decode_record(raw)
            except Corruption as e:
                log.warning("%s: dropping index entry: %s", self.name, e)
                bad.append(key)
                continue
            if not self._alloc.reserve(offset, size):
                log.warning("%s: dropping index entry with invalid/overlapping extent", self.name)
                bad.append(key)
                continue
            self._entries[key] = (offset, size, checksum)
        for key in bad:
            self._db.delete(key)
        self.corrupt_on_open += len(bad)

    # -- Tier --------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._alloc.capacity

    @property
    def used(self) -> int:
        return self._alloc.used

    def charge(self, nbytes: int) -> int:
        return self._alloc.rounded(nbytes)

    def fits(self, nbytes: int) -> bool:
        return self._alloc.largest_free >= self._alloc.rounded(nbytes)

    def put(self, key: bytes, data: Buffer, checksum: int | None = None) -> int:
        src = memoryview(data).cast("B")
        return self.put_padded(key, src, len(src), checksum)

    def put_padded(self, key: bytes, data: memoryview, size: int, checksum: int | None) -> int:
        """Store the first ``size`` bytes of ``data``.

        When ``data`` is aligned and already padded to the allocation size (an
        arena allocation's full view), it is written as is with no copy.
        """
        need = self._alloc.rounded(size)
        with self._lock:
            offset = self._alloc.alloc(size)
        if offset is None:
            raise NoSpace(f"{self.name}: no free extent of {format_size(size)}")
        try:
            if self.direct and not (len(data) >= need and _aligned(data, self._alloc.alignment)):
                buf = self._bounce(need)
                if checksum is None:
                    checksum = copy_hashed(data[:size], buf[:size], key)
                else:
                    copy_verified(data[:size], buf[:size], checksum, key, what=self.name)
                buf[size:need] = bytes(need - size)
                self._pwrite(buf[:need], offset)
            else:
                if checksum is None:
                    checksum = compute_checksum(data[:size], key)
                self._pwrite(data[: need if self.direct else size], offset)
            if self.sync:
                os.fdatasync(self._fd)
            self._index_put(key, encode_record(offset, size, checksum))
        except BaseException as e:
            with self._lock:
                self._alloc.free(offset, size)
            if isinstance(e, OSError):
                raise from_errno(e, f"{self.name}: writing {format_size(size)}") from e
            raise
        with self._lock:
            old = self._entries.get(key)
            self._entries[key] = (offset, size, checksum)
            if old is not None:
                self._alloc.free(old[0], old[1])
        return checksum

    def _index_put(self, key: bytes, record: bytes) -> None:
        self._index_write(key, record)

    def _index_write(self, key: bytes, record: bytes | None) -> None:
        """One index write (``None``: delete). After an I/O error (a full disk) RocksDB
        refuses every later write ("Writer has previous error") even once the cause is
        gone, which would leave this tier unable to store anything until a restart: the
        index is then reopened (its WAL holds every acknowledged record) and the write
        retried once, at most one reopen a second. NoSpace or KVStoreError if it fails."""
        err: Exception | None = None
        for attempt in (0, 1):
            try:
                with self._ilock:
                    if record is None:
                        self._db.delete(key)
                    else:
                        self._db.put(key, record, self._wopts)
                return
            except Exception as e:  # noqa: BLE001 - rocksdict raises bare Exception for I/O errors
                err = e
                if attempt == 0 and self._reopen_index(e):
                    continue
                break
        msg = f"{self.name}: index write failed under {self.directory}: {err}"
        if "space" in str(err).lower():
            raise NoSpace(msg + "; free disk space") from err
        raise KVStoreError(msg) from err

    def _reopen_index(self, cause: Exception) -> bool:
        """Reopen the index after a failed write (see :meth:`_index_write`); True if reopened."""
        now = time.monotonic()
        with self._ilock:
            if now - self._reopened_at < 1.0:
                return False
            self._reopened_at = now
            try:
                self._db.close()
            except Exception as e:  # noqa: BLE001 - rocksdict raises bare Exception; the WAL is intact
                log.debug("%s: closing the failed index: %s", self.name, e)
            try:
                self._db = self._open_index()
            except KVStoreError as e:
                log.error("%s: index write failed (%s) and reopening it failed too: %s", self.name, cause, e)
                return False
        self.index_reopens += 1
        log.warning("%s: index write failed (%s); reopened the index", self.name, cause)
        return True

    def read_into(self, key: bytes, dst: memoryview) -> None:
        """Read and verify; ``dst`` may be longer than the chunk (only its head is used).

        An aligned ``dst`` of at least the allocation size is read into directly.
        """
        e = self._entries.get(key)
        if e is None:
            raise NotFound(f"{self.name}: key not stored")
        offset, size, checksum = e
        need = self._alloc.rounded(size)
        if len(dst) < size:
            raise InvalidArgument(f"{self.name}: buffer of {len(dst)} bytes < chunk {size}")
        try:
            if self.direct and not (len(dst) >= need and _aligned(dst, self._alloc.alignment)):
                buf = self._bounce(need)
                self._pread(buf[:need], offset)
                copy_verified(buf[:size], dst[:size], checksum, key, what=self.name)
            else:
                self._pread(dst[: need if self.direct else size], offset)
                verify(dst[:size], checksum, key, what=self.name)
        except Corruption:
            self._drop(key, e)
            raise
        except OSError as err:
            raise from_errno(err, f"{self.name}: reading {format_size(size)}") from err

    def _drop(self, key: bytes, expect: tuple[int, int, int]) -> None:
        with self._lock:
            if self._entries.get(key) != expect:
                return
            del self._entries[key]
            self._alloc.free(expect[0], expect[1])
        self._forget_record(key)

    def remove(self, key: bytes) -> bool:
        with self._lock:
            e = self._entries.pop(key, None)
            if e is None:
                return False
            self._alloc.free(e[0], e[1])
        self._forget_record(key)
        return True

    def _forget_record(self, key: bytes) -> None:
        """Delete a key's index record; if that fails the record outlives the chunk, which
        is harmless: after a restart it names an extent whose bytes fail the key-seeded
        checksum (a miss, never wrong bytes)."""
        try:
            self._index_write(key, None)
        except KVStoreError as e:
            log.error("%s", e)

    def entry(self, key: bytes) -> Entry | None:
        e = self._entries.get(key)
        return None if e is None else Entry(e[1], e[2])

    def keys(self) -> Iterator[bytes]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        if self._db is None:
            return
        try:
            self._db.close()
        except Exception as e:  # noqa: BLE001 - rocksdict raises bare Exception
            # The WAL already holds every acknowledged record; only the flush failed.
            log.error("%s: index flush at close failed (%s); the WAL will be replayed", self.name, e)
        self._db = None  # type: ignore[assignment]
        if self._dfd != self._fd:
            os.close(self._dfd)
        os.close(self._fd)

    # -- I/O helpers --------------------------------------------------------

    def _bounce(self, nbytes: int) -> memoryview:
        """Per-thread aligned scratch buffer, grown on demand."""
        buf: np.ndarray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = aligned_buffer(max(nbytes, 1 << 20), self._alloc.alignment)
            self._local.buf = buf
        return buf.data

    def _pwrite(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            done += os.pwrite(self._dfd, buf[done:], offset + done)

    def _pread(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self._dfd, [buf[done:]], offset + done)
            if n == 0:
                raise Corruption(f"{self.name}: data file ends before offset {offset + done}")
            done += n


def _aligned(buf: memoryview, alignment: int) -> bool:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) % alignment == 0
