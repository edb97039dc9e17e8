"""The ``Transport`` interface: register memory, exchange metadata, post batched transfers.

Modelled on NIXL: register memory once, exchange opaque endpoint metadata
once, then post one-shot batched reads/writes of descriptor lists and poll or
await their completion. Backends are chosen by URI scheme
(:mod:`transport.registry`) and all built as ``Backend(uri, options)``.

Primitives (``T`` a transport, ``h`` a :class:`~transport.handle.Handle`):

=======================  ========  ==========================================================
call                     blocks?   contract
=======================  ========  ==========================================================
``T.metadata()``         no        opaque bytes a peer passes to ``connect``; stable for T's life
``T.register(buf)``      no        host buffer-protocol object (numpy, Arena view, mmap) or a
                                   CUDA buffer on device-capable backends -> :class:`Region`.
                                   Caller keeps ``buf`` alive and in place until deregistered.
``T.allocate(n)``        no        memory the backend serves best (shared segment for shm://),
                                   registered; owned by T, freed at deregister/close
``T.deregister(r)``      briefly   waits for in-flight server-side use of ``r`` to end; after it
                                   returns T never touches ``r``'s memory again
``T.connect(meta)``      yes       connects to the peer (bounded by ``timeout``) -> peer handle
``T.write(p, descs)``    no        copies local ranges into the peer's ranges -> ``h``
``T.read(p, descs)``     no        copies the peer's ranges into local ranges -> ``h``
``T.notify(p, msg)``     no        delivers ``msg`` into the peer's :attr:`notifications` -> ``h``
``T.notifications``      --        inbox the receiver waits on (``wait_for(msg)``)
``T.map_remote(p, rr)``  once      ``mappable`` backends only: a writable view of the peer's
                                   region ``rr`` in this process (one-sided loads and stores;
                                   the view stays valid while ``p`` is open, even if the peer
                                   dies: check ``p.alive()``)
``T.close()``            briefly   stops serving, fails pending handles; idempotent
=======================  ========  ==========================================================

Buffer ownership: between posting and ``h.done()`` the local ranges belong
to the transport: do not modify a write's source nor read a read's destination.
``h`` is done only after the backend stopped touching them (success, error,
cancel or deadline alike). A write's ``notify`` message is delivered only after
every range of the batch landed, so "layer l has landed" needs no extra sync.

Deadlines: ``timeout`` (seconds) makes the operation fail with
:class:`~kvstore.errors.Timeout` once expired. ``h.cancel()`` fails it with
:class:`~transport.handle.Cancelled`. A lost peer fails it with
:class:`~kvstore.errors.TransportError`; a range that failed ``checksum``
verification with :class:`~kvstore.errors.Corruption`; bad descriptors raise
:class:`~kvstore.errors.InvalidArgument` at post time (and are re-checked by
the serving side against its registration before any byte is written).

Thread-safety: every method may be called from any thread concurrently.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from kvstore.errors import InvalidArgument, TransportError
from transport.handle import Handle, watchdog
from transport.notify import MAX_NOTIFY, Notifications
from transport.regions import Desc, Region, RemoteRegion, byte_view, device_nbytes, device_of

MAX_DESCS = 65536
"""Most descriptors in one batch (the wire format rejects more)."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. Core code asks these, never the backend's type."""

    same_host_only: bool
    """Peers must run on the same host (shared memory)."""
    zero_copy: bool
    """Bytes move between registered buffers without intermediate copies."""
    device_memory: bool
    """CUDA buffers can be registered."""
    remote: bool
    """Peers on other hosts are reachable."""
    in_process: bool = False
    """Peers must live in the same process (test transport)."""
    mappable: bool = False
    """Memory from :meth:`Transport.allocate` can be mapped by peers (:meth:`Transport.map_remote`)."""


@dataclass(frozen=True)
class TransportOptions:
    """Options every backend accepts; backend-specific ones come as URI query params."""

    streams: int = 4
    """Parallel connections (or copy threads) per peer for large batches."""
    stripe_min: int = 1 << 20
    """Batches smaller than twice this go on one stream."""
    connect_timeout: float = 10.0
    """Seconds ``connect`` may take."""
    params: dict[str, str] = field(default_factory=dict)
    """Backend-specific settings (from ``?key=value`` in the URI)."""
    listen: bool = True
    """Serve peers. ``False``: an initiator only (no listening socket, no server threads;
    :meth:`Transport.metadata` then raises), for processes that only connect out."""
    token: bytes | None = None
    """Credential sent when connecting to peers that require one (``tcp://``: an AUTH frame)."""
    authorize: Callable[[bytes | None], bool] | None = None
    """Serving side: a peer must first present a token this accepts (``tcp://``); None: open."""
    tls_server: Any = None
    """``ssl.SSLContext`` to serve with (``tcp://``); None: plain TCP."""
    tls_client: Any = None
    """``ssl.SSLContext`` to connect with (``tcp://``; verifies the peer's certificate and name)."""
    max_connections: int = 4096
    """Serving side (``tcp://``, ``shm://``): connections served at once, a thread each; at
    the cap a new peer takes the place of the connection idle longest (none idle: refused)."""


class Peer:
    """A connected peer. Backends subclass it; callers treat it as opaque."""

    def __init__(self, name: str, metadata: bytes) -> None:
        self.name = name
        self.metadata = metadata
        self.closed = False

    def close(self) -> None:
        """Drop connections to the peer. Idempotent; pending handles fail."""
        self.closed = True

    def alive(self) -> bool:
        """``False`` once the peer is known to be gone. Cheap (no round trip)."""
        return not self.closed


class Transport(ABC):
    """One side of the transfer engine. See the module docstring for the contract."""

    scheme: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def __init__(self, uri: str, options: TransportOptions | None = None) -> None:
        parts = urlsplit(uri)
        if parts.scheme != self.scheme:
            raise InvalidArgument(f"{type(self).__name__} serves {self.scheme}://, not {uri!r}")
        opts = options or TransportOptions()
        params = dict(opts.params)
        params.update(parse_qsl(parts.query))
        self.options = dataclasses.replace(opts, params=params)
        if self.options.streams < 1:
            raise InvalidArgument(f"streams must be >= 1, got {self.options.streams}")
        self.uri = uri
        self.host = parts.hostname or ""
        self.port = parts.port or 0
        self.name = (parts.netloc or parts.path).split("?")[0]
        self.notifications = Notifications()
        self._regions: dict[int, Region] = {}
        self._in_use: dict[int, int] = {}
        self._reg_cv = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False

    # ---- memory ------------------------------------------------------------
    def register(self, buf: Any, *, name: str = "") -> Region:
        """Register ``buf`` (see the module docstring). Raises InvalidArgument."""
        self._check_open()
        dev = device_of(buf)
        if dev != "cpu":
            if not self.capabilities.device_memory:
                raise InvalidArgument(f"{self.scheme}:// cannot register {dev} memory ({name})")
            region = Region(next(self._ids), device_nbytes(buf), None, buf, id(self), name, dev)
        else:
            view = byte_view(buf, name or "register")
            if view.readonly:
                raise InvalidArgument(f"register {name}: buffer is read-only")
            region = Region(next(self._ids), view.nbytes, view, buf, id(self), name)
        if region.nbytes == 0:
            raise InvalidArgument(f"register {name}: empty buffer")
        self._register(region)
        with self._reg_cv:
            self._regions[region.id] = region
        return region

    def allocate(self, nbytes: int, *, name: str = "") -> Region:
        """Allocate (zeroed) and register ``nbytes`` of memory owned by this transport."""
        if nbytes <= 0:
            raise InvalidArgument(f"allocate {name}: size must be > 0, got {nbytes}")
        return self.register(_aligned(nbytes), name=name)

    def deregister(self, region: Region, timeout: float = 30.0) -> None:
        """Stop serving ``region``; waits (up to ``timeout``) for in-flight serving to end."""
        with self._reg_cv:
            if self._regions.pop(region.id, None) is None:
                raise InvalidArgument(f"region {region.id} ({region.name}) is not registered")
            if not self._reg_cv.wait_for(lambda: self._in_use.get(region.id, 0) == 0, timeout):
                raise TransportError(f"region {region.id} still in use after {timeout}s")
        self._deregister(region)

    def _acquire(self, region_id: int) -> Region | None:
        """Serving side: pin a region against deregistration (None if unknown)."""
        with self._reg_cv:
            r = self._regions.get(region_id)
            if r is not None:
                self._in_use[region_id] = self._in_use.get(region_id, 0) + 1
            return r

    def _release(self, region_id: int) -> None:
        with self._reg_cv:
            self._in_use[region_id] -= 1
            if self._in_use[region_id] == 0:
                del self._in_use[region_id]
                self._reg_cv.notify_all()

    # ---- peers and transfers -------------------------------------------------
    def metadata(self) -> bytes:
        """Opaque endpoint metadata for peers' :meth:`connect`."""
        self._check_open()
        if not self.options.listen:
            raise InvalidArgument(f"{self.uri} was created as an initiator only (listen=False): peers cannot "
                                  "connect to it")
        return self._metadata()

    def connect(self, metadata: bytes, *, timeout: float | None = None) -> Peer:
        """Connect to the transport that produced ``metadata``. Blocking."""
        self._check_open()
        return self._connect(bytes(metadata), self.options.connect_timeout if timeout is None else timeout)

    def write(
        self,
        peer: Peer,
        descs: Sequence[Desc],
        *,
        timeout: float | None = None,
        checksum: bool = False,
        notify: bytes | None = None,
    ) -> Handle:
        """Post a batched write (local -> peer). Non-blocking; see the module docstring."""
        h = self._start("write", peer, descs, timeout, writable_local=False)
        if notify is not None and len(notify) > MAX_NOTIFY:
            raise InvalidArgument(f"notification of {len(notify)} B exceeds {MAX_NOTIFY} B")
        self._post_write(peer, list(descs), h, checksum, notify)
        return h

    def read(
        self,
        peer: Peer,
        descs: Sequence[Desc],
        *,
        timeout: float | None = None,
        checksum: bool = False,
    ) -> Handle:
        """Post a batched read (peer -> local). Non-blocking; see the module docstring."""
        h = self._start("read", peer, descs, timeout, writable_local=True)
        self._post_read(peer, list(descs), h, checksum)
        return h

    def map_remote(self, peer: Peer, remote: RemoteRegion, *, timeout: float | None = None) -> memoryview:
        """A view of ``peer``'s allocated region ``remote`` mapped into this process.

        Blocking the first time (the mapping is set up), cheap after that. Only for
        ``capabilities.mappable`` backends and regions from the peer's :meth:`allocate`;
        raises InvalidArgument otherwise.
        """
        self._check_open()
        if not self.capabilities.mappable:
            raise InvalidArgument(f"{self.scheme}:// regions cannot be mapped by peers")
        return self._map_remote(peer, remote, _deadline(self.options.connect_timeout if timeout is None
                                                        else timeout))

    def notify(self, peer: Peer, msg: bytes, *, timeout: float | None = None) -> Handle:
        """Post a notification to ``peer``. Non-blocking."""
        self._check_open()
        if len(msg) > MAX_NOTIFY:
            raise InvalidArgument(f"notification of {len(msg)} B exceeds {MAX_NOTIFY} B")
        h = Handle(f"{self.scheme} notify to {peer.name}", 0, _deadline(timeout))
        watchdog.watch(h)
        self._post_notify(peer, bytes(msg), h)
        return h

    def close(self) -> None:
        """Stop serving and drop peers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._close()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"{self.uri}: transport is closed")

    def _start(
        self, op: str, peer: Peer, descs: Sequence[Desc], timeout: float | None, writable_local: bool
    ) -> Handle:
        self._check_open()
        if peer.closed:
            raise TransportError(f"{op} to {peer.name}: peer connection is closed")
        if not 1 <= len(descs) <= MAX_DESCS:
            raise InvalidArgument(f"{op}: a batch holds 1..{MAX_DESCS} descriptors, got {len(descs)}")
        total = 0
        for i, d in enumerate(descs):
            _check_desc(self, op, i, d)
            total += d.length
        h = Handle(f"{self.scheme} {op} of {len(descs)} range(s) to {peer.name}", total, _deadline(timeout))
        watchdog.watch(h)
        return h

    # ---- backend hooks -------------------------------------------------------
    def _register(self, region: Region) -> None:  # noqa: B027 - optional hook
        """Backend hook: prepare ``region`` for transfers (may set ``extra``/``backend``)."""

    def _deregister(self, region: Region) -> None:  # noqa: B027 - optional hook
        """Backend hook: release what ``_register`` set up."""

    def _map_remote(self, peer: Peer, remote: RemoteRegion, deadline: float | None) -> memoryview:
        """Backend hook of ``mappable`` backends."""
        raise InvalidArgument(f"{self.scheme}:// regions cannot be mapped by peers")

    @abstractmethod
    def _metadata(self) -> bytes: ...

    @abstractmethod
    def _connect(self, metadata: bytes, timeout: float) -> Peer: ...

    @abstractmethod
    def _post_write(
        self, peer: Peer, descs: list[Desc], h: Handle, checksum: bool, notify: bytes | None
    ) -> None: ...

    @abstractmethod
    def _post_read(self, peer: Peer, descs: list[Desc], h: Handle, checksum: bool) -> None: ...

    @abstractmethod
    def _post_notify(self, peer: Peer, msg: bytes, h: Handle) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if timeout < 0:
        raise InvalidArgument(f"timeout must be >= 0, got {timeout}")
    return time.monotonic() + timeout


def _check_desc(t: Transport, op: str, i: int, d: Desc) -> None:
    local, loff, remote, roff, n = d
    if t._regions.get(local.id) is not local:
        raise InvalidArgument(f"{op}: descriptor {i}: local region {local.id} is not registered here")
    if not isinstance(remote, RemoteRegion):
        raise InvalidArgument(f"{op}: descriptor {i}: remote must be a RemoteRegion")
    for what, v in (("local offset", loff), ("remote offset", roff), ("length", n)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InvalidArgument(f"{op}: descriptor {i}: bad {what} {v!r}")
    if n == 0:
        raise InvalidArgument(f"{op}: descriptor {i}: zero-length range")
    if loff + n > local.nbytes:
        raise InvalidArgument(
            f"{op}: descriptor {i}: local range {loff}+{n} exceeds region {local.id} of {local.nbytes} B"
        )
    if roff + n > remote.nbytes:
        raise InvalidArgument(
            f"{op}: descriptor {i}: remote range {roff}+{n} exceeds region {remote.region_id} "
            f"of {remote.nbytes} B"
        )


def _aligned(nbytes: int) -> np.ndarray:
    raw = np.zeros(nbytes + 4096, dtype=np.uint8)
    shift = (-raw.ctypes.data) % 4096
    return raw[shift : shift + nbytes]
