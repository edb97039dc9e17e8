"""Finding the master: a plain ``host:port``, or the leader of a cluster of masters in etcd.

Wherever a master address is taken (``Client``, ``AsyncClient``, ``kvstore node
--master``, the CLI), ``etcd://HOST:PORT[,HOST:PORT...]/CLUSTER`` names a cluster
of masters instead (``kvstore master --etcd ... --cluster CLUSTER``): the leader
publishes its address under ``/kvstore/CLUSTER/leader``, attached to its etcd
lease (:mod:`kvstore.master.election`), and callers read it from there, and again
whenever the master they use stops answering or says it is not the leader.

The read is one etcd ``Range`` through the generated etcd v3 stubs that ship with
``aetcd`` (``pip install 'kvstore[ha]'``), blocking or on asyncio.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc

from kvstore.errors import InvalidArgument, TransportError
from kvstore.tls import ClientTLS

log = logging.getLogger(__name__)

SCHEME = "etcd://"
PREFIX = "/kvstore/"


def is_etcd(address: str) -> bool:
    return address.startswith(SCHEME)


@dataclass(frozen=True)
class EtcdTarget:
    """etcd endpoints (``host:port``) and the name of a cluster of masters."""

    endpoints: tuple[str, ...]
    cluster: str

    @property
    def leader_key(self) -> bytes:
        return f"{PREFIX}{self.cluster}/leader".encode()

    @property
    def url(self) -> str:
        return f"{SCHEME}{','.join(self.endpoints)}/{self.cluster}"


def parse_etcd(url: str) -> EtcdTarget:
    """``etcd://HOST:PORT[,HOST:PORT...]/CLUSTER`` -> :class:`EtcdTarget`; InvalidArgument otherwise."""
    if not is_etcd(url):
        raise InvalidArgument(f"{url!r} is not an etcd:// address (etcd://HOST:PORT[,HOST:PORT]/CLUSTER)")
    hosts, _, cluster = url[len(SCHEME):].partition("/")
    endpoints = tuple(h.strip() for h in hosts.split(",") if h.strip())
    check_cluster(cluster)
    if not endpoints or any(not _host_port(e) for e in endpoints):
        raise InvalidArgument(f"{url!r}: give the etcd endpoints as HOST:PORT[,HOST:PORT] "
                              "(e.g. etcd://127.0.0.1:2379/kv)")
    return EtcdTarget(endpoints, cluster)


def parse_endpoints(spec: str) -> tuple[str, ...]:
    """``[http://]HOST:PORT[,...]`` (as ``--etcd`` takes them) -> ``("HOST:PORT", ...)``."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        for scheme in ("http://", "etcd://"):
            part = part.removeprefix(scheme)
        part = part.rstrip("/")
        if not _host_port(part):
            raise InvalidArgument(f"etcd endpoint {part!r} must be HOST:PORT (e.g. 127.0.0.1:2379)")
        out.append(part)
    return tuple(out)


def check_cluster(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidArgument(f"cluster name {name!r} must be 1-64 letters, digits, '-', '_' or '.'")
    return name


def _host_port(s: str) -> bool:
    host, _, port = s.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def leader_value(address: str, name: str) -> bytes:
    """What the leader publishes: its gRPC address, who it is, since when."""
    return json.dumps({"address": address, "name": name, "since": time.time()}).encode()


def leader_address(value: bytes, target: EtcdTarget) -> str:
    try:
        address = json.loads(value)["address"]
    except (ValueError, KeyError, TypeError) as e:
        raise TransportError(f"{target.url}: unreadable leader record {value[:80]!r}") from e
    if not isinstance(address, str) or not _host_port(address):
        raise TransportError(f"{target.url}: bad leader address {address!r}")
    return address


def _stubs() -> Any:
    try:
        from aetcd import rpc
    except ImportError as e:
        raise InvalidArgument("etcd:// master addresses need aetcd: pip install 'kvstore[ha]'") from e
    return rpc


def find_leader(target: EtcdTarget, timeout: float) -> str:
    """The current leader's address (blocking). TransportError (retryable) when no
    endpoint answers or no master leads the cluster right now."""
    from aetcd.rpc import rpc_pb2_grpc  # the same generated stubs, on a blocking channel

    rpc = _stubs()
    deadline = time.monotonic() + timeout
    errors = []
    for ep in target.endpoints:
        with grpc.insecure_channel(ep) as ch:
            try:
                resp = rpc_pb2_grpc.KVStub(ch).Range(rpc.RangeRequest(key=target.leader_key),
                                                     timeout=max(deadline - time.monotonic(), 0.05))
            except grpc.RpcError as e:
                errors.append(_failed(ep, e))
                continue
        return _leader_in(resp, target)
    raise _unreachable(target, errors)


async def find_leader_async(target: EtcdTarget, timeout: float) -> str:
    """:func:`find_leader` on asyncio."""
    rpc = _stubs()
    deadline = time.monotonic() + timeout
    errors = []
    for ep in target.endpoints:
        async with rpc.insecure_channel(ep) as ch:
            try:
                resp = await rpc.KVStub(ch).Range(rpc.RangeRequest(key=target.leader_key),
                                                  timeout=max(deadline - time.monotonic(), 0.05))
            except grpc.RpcError as e:
                errors.append(_failed(ep, e))
                continue
        return _leader_in(resp, target)
    raise _unreachable(target, errors)


def _leader_in(resp: Any, target: EtcdTarget) -> str:
    """The leader address in an etcd Range answer for the leader key."""
    if not resp.kvs:
        raise TransportError(f"{target.url}: no master leads cluster {target.cluster!r} right now "
                             "(is a `kvstore master --etcd ... --cluster ...` running?)")
    return leader_address(resp.kvs[0].value, target)


def _failed(endpoint: str, e: grpc.RpcError) -> str:
    return f"{endpoint}: {e.code().name if hasattr(e, 'code') else e}"


def _unreachable(target: EtcdTarget, errors: list[str]) -> TransportError:
    return TransportError(f"{target.url}: no etcd endpoint answered ({'; '.join(errors)})")


class MasterAddress:
    """A caller's master: fixed (``host:port``) or followed through etcd.

    ``current`` is the address to dial; ``stale()`` says the master at it failed or
    is not the leader, so the next ``current`` asks etcd again (at most every
    ``min_interval`` seconds, so a dead cluster is not hammered). Thread-safe.
    """

    def __init__(self, address: str, *, min_interval: float = 0.2) -> None:
        self.configured = address
        self.target = parse_etcd(address) if is_etcd(address) else None
        self._current = address if self.target is None else ""
        self._checked = 0.0
        self._stale = self.target is not None
        self._min_interval = min_interval
        self._lock = threading.Lock()

    @property
    def followed(self) -> bool:
        return self.target is not None

    def peek(self) -> str:
        """The last known address ("" before the first lookup of a followed one)."""
        return self._current

    def current(self, timeout: float) -> str:
        """The address to dial (blocking etcd read when stale)."""
        if self.target is None or not self._due():
            return self._current
        return self._set(find_leader(self.target, timeout))

    async def current_async(self, timeout: float) -> str:
        if self.target is None or not self._due():
            return self._current
        return self._set(await find_leader_async(self.target, timeout))

    def stale(self) -> None:
        """The master at :meth:`current` failed: look it up again before the next call."""
        if self.target is not None:
            with self._lock:
                self._stale = True

    def _due(self) -> bool:
        """Whether to ask etcd now (then the lookup counts as done, for the rate limit)."""
        with self._lock:
            if not self._stale and self._current:
                return False
            if self._current and time.monotonic() - self._checked < self._min_interval:
                return False
            self._checked = time.monotonic()
            return True

    def _set(self, address: str) -> str:
        with self._lock:
            self._current, self._stale = address, False
        return address


class MasterLink:
    """A blocking gRPC channel to the master that follows the leader: :meth:`stub` dials
    the current address (re-dialling when it changed), :meth:`failed` makes the next
    :meth:`stub` look the leader up again. Thread-safe."""

    def __init__(self, address: str, options: list[tuple[str, Any]], tls: ClientTLS | None = None) -> None:
        self.address = MasterAddress(address)
        self._options = options
        self._credentials: Any = tls.grpc_credentials() if tls is not None else None
        self._dialed = ""
        self._channel: grpc.Channel | None = None
        self._stub: Any = None
        self._lock = threading.Lock()

    def stub(self, timeout: float) -> Any:
        """The master's stub (``MasterStub``); TransportError when no leader can be found."""
        from kvstore.v1 import master_pb2_grpc

        address = self.address.current(timeout)
        with self._lock:
            if address != self._dialed or self._stub is None:
                if self._channel is not None:
                    self._channel.close()
                self._channel = grpc.insecure_channel(address, options=self._options) if self._credentials is None \
                    else grpc.secure_channel(address, self._credentials, options=self._options)
                self._stub = master_pb2_grpc.MasterStub(self._channel)  # type: ignore[no-untyped-call]
                self._dialed = address
            return self._stub

    def events(self, timeout: float) -> Any:
        """The ``Events`` stub on the same channel (the current leader)."""
        from kvstore.v1 import master_pb2_grpc

        self.stub(timeout)
        with self._lock:
            return master_pb2_grpc.EventsStub(self._channel)  # type: ignore[no-untyped-call]

    @property
    def dialed(self) -> str:
        return self._dialed or self.address.peek() or self.address.configured

    def failed(self) -> None:
        self.address.stale()

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel, self._stub, self._dialed = None, None, ""


class LeaderWatch:
    """Calls ``on_change()`` whenever the leader record of ``target`` changes (etcd Watch on
    a background thread), so a node re-registers with a new leader at once instead of at
    its next failed heartbeat. Reconnects (to the next endpoint) until :meth:`stop`."""

    def __init__(self, target: EtcdTarget, on_change: Any) -> None:
        self.target = target
        self._on_change = on_change
        self._stop = threading.Event()
        self._call: Any = None
        self._thread = threading.Thread(target=self._run, name="kvstore-leader-watch", daemon=True)

    def start(self) -> LeaderWatch:
        self._thread.start()
        return self

    def _requests(self, rpc: Any) -> Any:
        yield rpc.WatchRequest(create_request=rpc.WatchCreateRequest(key=self.target.leader_key))
        self._stop.wait()  # keeps the stream open until stopped

    def _run(self) -> None:
        from aetcd.rpc import rpc_pb2_grpc

        rpc = _stubs()
        i = 0
        while not self._stop.is_set():
            ep = self.target.endpoints[i % len(self.target.endpoints)]
            i += 1
            with grpc.insecure_channel(ep) as ch:
                try:
                    self._call = rpc_pb2_grpc.WatchStub(ch).Watch(self._requests(rpc))
                    for resp in self._call:
                        if resp.events:
                            self._on_change()
                except grpc.RpcError as e:
                    if self._stop.is_set():
                        return
                    log.debug("etcd watch on %s: %s; reconnecting", ep, e)
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=5)
