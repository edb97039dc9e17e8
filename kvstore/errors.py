"""One error tree for kvstore.

Every failure a caller can act on is a :class:`KVStoreError`; the subclass says
what to do next:

==================  ===================================================  =========
class               meaning / what the caller does                       retryable
==================  ===================================================  =========
NotFound            the key is not stored (a miss); recompute or skip     no
TryAgain            transient contention or a replica in flight; retry    yes
Timeout             a deadline expired; retry with a longer deadline      yes
Corruption          stored bytes failed their checksum; treated as miss   no
NoSpace             a tier or arena is full and nothing can be evicted    no
PermissionDenied    the caller may not do this (tenant, token, mode)      no
InvalidArgument     bad input (key, size, buffer, config value)           no
TransportError      the peer or link failed mid-operation                 yes
==================  ===================================================  =========

Status vocabularies map to this tree here, in one place: the per-item statuses
of the master (``ItemStatus``), of the node control channel (``SlotStatus``) and
of the transport's wire replies, by name (:data:`STATUS_ERRORS`,
:func:`status_error`); OS errors (:func:`from_errno`). gRPC status codes of
whole calls map in :mod:`kvstore.master.errors` (their names differ in meaning:
gRPC's ALREADY_EXISTS is a refused request, the ItemStatus one a no-op).
``tests/kvstore/test_statuses.py`` checks every vocabulary is covered.
"""

from __future__ import annotations

import errno as _errno


class KVStoreError(Exception):
    """Base of every error kvstore raises on purpose."""

    retryable: bool = False


class NotFound(KVStoreError):
    """The key is not stored anywhere the caller can reach."""


class TryAgain(KVStoreError):
    """Transient condition (contention, write in flight); retrying may succeed."""

    retryable = True


class Timeout(KVStoreError):
    """A deadline expired before the operation completed."""

    retryable = True


class Corruption(KVStoreError):
    """Stored or transferred bytes do not match their checksum.

    Stores never hand such bytes out: the chunk is dropped and reported as a miss.
    """


class NoSpace(KVStoreError):
    """A tier, arena or disk is full and nothing more can be evicted."""


class PermissionDenied(KVStoreError):
    """The caller is not allowed to perform this operation."""


class InvalidArgument(KVStoreError, ValueError):
    """Bad input: a malformed key, a size out of range, a buffer too small."""


class ConfigError(InvalidArgument):
    """A configuration value is invalid; the message names the key."""


class TransportError(KVStoreError):
    """The transfer engine lost its peer or the link failed."""

    retryable = True


def from_errno(err: OSError, what: str) -> KVStoreError:
    """Map an ``OSError`` to the error tree, keeping the OS message and ``what`` failed."""
    code = err.errno
    msg = f"{what}: {err.strerror or err}"
    if code in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
        return NoSpace(msg)
    if code in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        return PermissionDenied(msg)
    if code in (_errno.EAGAIN, _errno.EINTR, _errno.EBUSY):
        return TryAgain(msg)
    if code in (_errno.ETIMEDOUT,):
        return Timeout(msg)
    if code in (_errno.EINVAL, _errno.ENAMETOOLONG, _errno.ENOTDIR, _errno.EISDIR):
        return InvalidArgument(msg)
    if code in (_errno.EIO, _errno.EBADMSG):
        return Corruption(msg)
    return KVStoreError(msg)


STATUS_ERRORS: dict[str, type[KVStoreError] | None] = {
    "OK": None,
    "ALREADY_EXISTS": None,  # a put of a key that exists: nothing to write (keys are immutable)
    "NOT_FOUND": NotFound,
    "BUSY": TryAgain,  # another writer holds the key
    "LEASED": TryAgain,  # a reader holds the key
    "EXPIRED": TryAgain,  # a reservation, hold or cached location lapsed: start over
    "NO_SPACE": NoSpace,
    "CORRUPT": Corruption,
    "PINNED": InvalidArgument,  # unpin first
    "INVALID": InvalidArgument,
    "MALFORMED": InvalidArgument,
    "INTERNAL": TransportError,
    "DENIED": PermissionDenied,  # the peer refused this caller's credential
    "ITEM_STATUS_UNSPECIFIED": KVStoreError,
}
"""Per-item status name (any vocabulary) -> the error it means (``None``: not an error)."""


def status_error(name: str, msg: str) -> KVStoreError | None:
    """The error for a per-item status ``name`` (``None`` for OK-like ones); unknown
    names are a plain :class:`KVStoreError`. The message ends with the status name."""
    cls = STATUS_ERRORS.get(name, KVStoreError)
    return None if cls is None else cls(f"{msg} ({name})")
