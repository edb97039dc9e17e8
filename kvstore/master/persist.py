"""RocksDB persistence for the master: replays the state's journal in one batch per call.

The database (raw mode, under ``master.data_dir``) holds only what
:mod:`kvstore.master.codec` describes: complete objects, known nodes and two
counters. A write returns once RocksDB has the batch in its WAL (the OS has
it: a ``kill -9`` loses nothing); ``sync=True`` also fsyncs the WAL (power
loss loses nothing, each call pays an fsync).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from kvstore.errors import KVStoreError, NoSpace, from_errno
from kvstore.master.codec import Record

log = logging.getLogger(__name__)


class MasterStore:
    """The master's RocksDB. Blocking; not thread-safe (one event loop drives it).

    Raises :class:`~kvstore.errors.KVStoreError` (``NoSpace`` when the disk is
    full) when the database cannot be opened or written.
    """

    def __init__(self, directory: str | Path, *, sync: bool = False) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise from_errno(e, f"master: cannot create data dir {self.directory}") from e
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self._wopts = WriteOptions()
        self._wopts.sync = sync
        try:
            self._db = Rdict(str(self.directory / "meta"), opts)
        except Exception as e:  # noqa: BLE001 - rocksdict raises bare Exception
            raise KVStoreError(
                f"master: cannot open RocksDB under {self.directory}: {e}; is another "
                "master using this master.data_dir?") from e

    def load(self) -> Iterator[tuple[bytes, bytes]]:
        """Every stored record, in key order."""
        for k, v in self._db.items():
            yield cast(bytes, k), cast(bytes, v)

    def write(self, records: Sequence[Record]) -> None:
        """Apply ``records`` atomically, in order (``None`` deletes). No-op when empty."""
        if not records:
            return
        wb = WriteBatch(raw_mode=True)
        for k, v in records:
            if v is None:
                wb.delete(k)
            else:
                wb.put(k, v)
        try:
            self._db.write(wb, self._wopts)
        except Exception as e:  # noqa: BLE001 - rocksdict raises bare Exception for I/O errors
            msg = f"master: RocksDB write under {self.directory} failed: {e}"
            if "space" in str(e).lower():
                raise NoSpace(msg + "; free disk space") from e
            raise KVStoreError(msg) from e

    def close(self) -> None:
        """Flush and close; idempotent."""
        if self._db is not None:
            self._db.close()
            self._db = None  # type: ignore[assignment]
