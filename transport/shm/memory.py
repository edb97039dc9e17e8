"""Shared memory for ``shm://``: memfd segments passed by file descriptor, and CMA.

Two ways to expose a region to same-host peers, both "one copy, straight into
the destination":

* :func:`segment` — memory the transport allocates: an anonymous ``memfd``
  mapped ``MAP_SHARED``. Peers receive the descriptor over the control socket
  (``SCM_RIGHTS``) and map it; nothing is left in ``/dev/shm`` if a process is
  killed.
* Cross-memory attach (``process_vm_readv``/``process_vm_writev``) for any
  other registered buffer (numpy arrays, arena views): the kernel copies
  between the two address spaces. Needs ptrace permission over the peer (same
  user; Yama ptrace_scope 0, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import mmap
import os

import numpy as np

from kvstore.errors import InvalidArgument, TransportError

IOV_MAX = 1024
KIND_FD, KIND_CMA = 1, 2


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t


log = logging.getLogger(__name__)

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
"""A segment's size is fixed before anyone else gets it: a peer holding the memfd cannot
truncate it (which would make every mapping of it SIGBUS) nor grow it, nor unseal it."""


def segment(nbytes: int, name: str) -> tuple[int, mmap.mmap]:
    """A new shared segment: (memfd, MAP_SHARED mapping), sealed at its size, its memory
    allocated at once (in 2 MiB pages where the machine allows them, see
    :func:`_huge_pages`). Caller closes both."""
    fd = os.memfd_create(f"kvstore-{name}"[:240], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        m = mmap.mmap(fd, nbytes, mmap.MAP_SHARED)
        _huge_pages(m)  # before the pages exist: they are allocated huge or not at all
        if not populate(memoryview(m), write=True):  # an old kernel: prefault as the mapping is made
            m.close()
            m = mmap.mmap(fd, nbytes, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    except OSError:
        os.close(fd)
        raise
    return fd, m


def _huge_pages(m: mmap.mmap) -> None:
    """Ask for transparent huge pages on a shared mapping (``MADV_HUGEPAGE``). They take
    effect where the machine allows them for shared memory (``shmem_enabled`` in
    /sys/kernel/mm/transparent_hugepage set to ``advise`` or ``always``): then a peer maps
    the arena with one page-table entry per 2 MiB instead of 512, which is most of the
    cost of a first write into (or read from) a part of the arena it has not touched."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return
    try:
        m.madvise(advice)
    except OSError as e:  # a kernel without THP: 4 KiB pages, as before
        log.debug("MADV_HUGEPAGE refused: %s", e)


def map_fd(fd: int, expected: int) -> mmap.mmap:
    """Map a segment received from a peer; checks its seals (a segment its owner could
    shrink would crash this process) and its real size against ``expected``."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if seals & SEALS != SEALS:
            raise InvalidArgument("shared segment is not sealed against shrinking and growing: refusing "
                                  "to map it (its owner could truncate it under this process)")
        size = os.fstat(fd).st_size
        if size < expected:
            raise InvalidArgument(f"shared segment is {size} B, region claims {expected} B")
        m = mmap.mmap(fd, size, mmap.MAP_SHARED)
        _huge_pages(m)
        return m
    finally:
        os.close(fd)


def address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux 5.14+
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_populate_ok = True


def populate(view: memoryview, write: bool) -> bool:
    """Fill the page tables of a shared mapping's range in one syscall.

    A peer's segment is mapped lazily: touching a 4 MiB range page by page
    costs ~1,000 page-fault traps, which on a VM is slower than copying the
    bytes. MADV_POPULATE_{READ,WRITE} maps the whole range in the kernel at
    once; afterwards the call is cheap. Kernels without it fall back to faults
    (``False``: nothing was done).
    """
    global _populate_ok
    if not _populate_ok:
        return False
    if len(view) == 0:
        return True
    start = address(view)
    page = mmap.PAGESIZE
    base = start - start % page
    length = start + len(view) - base
    if _libc.madvise(base, length, _MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS):
            _populate_ok = False  # older kernel: plain page faults
            return False
    return True


def cma(pid: int, local: list[tuple[int, int]], remote: list[tuple[int, int]], write: bool) -> None:
    """Copy (addr, len) lists between this process and ``pid``; same total length.

    Raises TransportError when the peer is gone or the copy comes up short.
    """
    fn = _libc.process_vm_writev if write else _libc.process_vm_readv
    for i in range(0, len(local), IOV_MAX):
        lo, re = local[i : i + IOV_MAX], remote[i : i + IOV_MAX]
        liov = (_Iovec * len(lo))(*[_Iovec(a, n) for a, n in lo])
        riov = (_Iovec * len(re))(*[_Iovec(a, n) for a, n in re])
        want = sum(n for _, n in lo)
        got = fn(pid, liov, len(lo), riov, len(re), 0)
        if got < 0:
            e = ctypes.get_errno()
            if e == errno.ESRCH:
                raise TransportError(f"shm peer process {pid} is gone")
            raise TransportError(f"cross-memory copy with pid {pid} failed: {os.strerror(e)}")
        if got != want:
            raise TransportError(f"cross-memory copy with pid {pid} moved {got} of {want} B")
