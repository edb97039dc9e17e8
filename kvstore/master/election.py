"""Leader election of masters through etcd (``kvstore master --etcd ... --cluster NAME``).

Each master of a cluster campaigns for one key, ``/kvstore/NAME/leader``: it
grants itself an etcd lease of ``master.leader_ttl`` seconds and creates the key
under it in a transaction that succeeds only if the key does not exist. The
winner serves and keeps the lease alive; the others (standbys) retry every
``poll`` seconds. When the leader dies, is paused or is cut off from etcd, its
lease runs out, etcd deletes the key, and a standby wins within about one TTL.

A leader stops leading on its own once it cannot prove it still holds the
lease: :meth:`Election.leading` is false from the moment its last confirmed
keep-alive plus the TTL has passed (a process paused past its TTL wakes up
refusing calls, before any keep-alive runs), and :meth:`Election.lost` is set
when etcd says the lease is gone. The master then refuses every call with
UNAVAILABLE, so callers look the leader up again (:mod:`kvstore.master.discovery`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kvstore.errors import InvalidArgument, TransportError
from kvstore.master.discovery import EtcdTarget, leader_value

log = logging.getLogger(__name__)


def _aetcd() -> Any:
    try:
        import aetcd
    except ImportError as e:
        raise InvalidArgument("master.etcd needs aetcd: pip install 'kvstore[ha]'") from e
    return aetcd


_TXN_OPS = 100
"""Operations per etcd transaction (etcd refuses more than --max-txn-ops, 128 by default)."""


class Election:
    """One master's campaign for the leadership of ``target.cluster``. Use on one event loop."""

    def __init__(self, target: EtcdTarget, address: str, name: str, ttl_s: int, *, poll: float = 0.25) -> None:
        if ttl_s < 2:
            raise InvalidArgument(f"master.leader_ttl must be at least 2s, got {ttl_s}s")
        self.target, self.address, self.name, self.ttl_s, self.poll = target, address, name, ttl_s, poll
        self.lost = asyncio.Event()
        self._client: Any = None
        self._lease: Any = None
        self._until = 0.0  # monotonic time until which the lease is known to hold
        self._keeper: asyncio.Task[None] | None = None
        self._endpoint = 0

    def leading(self) -> bool:
        """True while the lease is known to hold (checked on every call the master serves)."""
        return self._lease is not None and not self.lost.is_set() and time.monotonic() < self._until

    async def _connect(self) -> Any:
        if self._client is None:
            host, _, port = self.target.endpoints[self._endpoint % len(self.target.endpoints)].rpartition(":")
            self._client = _aetcd().Client(host=host, port=int(port), timeout=max(1, self.ttl_s // 2))
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self._endpoint += 1  # the next attempt tries the next endpoint
        if client is not None:
            try:
                await client.close()
            except (OSError, RuntimeError, _aetcd().ClientError) as e:
                log.debug("closing etcd client: %s", e)

    async def campaign(self) -> None:
        """Return once this master leads (then keeps the lease alive in the background)."""
        aetcd = _aetcd()
        announced = False
        value = leader_value(self.address, self.name)
        while True:
            try:
                client = await self._connect()
                sent = time.monotonic()
                lease = await client.lease(self.ttl_s)
                tx = client.transactions
                won, _ = await client.transaction(
                    compare=[tx.create(self.target.leader_key) == 0],
                    success=[tx.put(self.target.leader_key, value, lease)],
                    failure=[])
                if won:
                    self._lease, self._until = lease, sent + lease.ttl
                    self.lost.clear()
                    self._keeper = asyncio.get_running_loop().create_task(self._keep_alive())
                    log.info("master %s leads cluster %s (etcd lease %x, ttl %ds)", self.name,
                             self.target.cluster, lease.id, lease.ttl)
                    return
                await lease.revoke()
                if not announced:
                    log.info("master %s is a standby of cluster %s", self.name, self.target.cluster)
                    announced = True
            except (aetcd.ClientError, OSError) as e:
                log.warning("master %s: etcd %s: %s; retrying", self.name, self.target.url, e)
                await self._drop_client()
            await asyncio.sleep(self.poll)

    async def _keep_alive(self) -> None:
        aetcd = _aetcd()
        every = self.ttl_s / 3
        while not self.lost.is_set():
            await asyncio.sleep(every)
            if time.monotonic() >= self._until:
                break  # paused or cut off past the lease: another master may lead by now
            try:
                sent = time.monotonic()
                reply = await self._lease.refresh()
                if reply is None or reply.TTL <= 0:
                    break  # etcd says the lease is gone
                self._until = sent + reply.TTL
            except (aetcd.ClientError, OSError) as e:
                log.warning("master %s: keep-alive to etcd failed (%s); leading for %.1fs more at most",
                            self.name, e, max(self._until - time.monotonic(), 0))
                await self._drop_client()
                try:
                    client = await self._connect()
                    self._lease = _aetcd().Lease(self._lease.id, self.ttl_s, client)
                except (aetcd.ClientError, OSError) as e2:
                    log.debug("etcd reconnect: %s", e2)
        log.error("master %s lost the leadership of cluster %s (its etcd lease ran out)",
                  self.name, self.target.cluster)
        self.lost.set()

    @property
    def _pins_prefix(self) -> bytes:
        return self.target.leader_key.rpartition(b"/")[0] + b"/pins/"

    async def save_pins(self, changes: list[tuple[bytes, int | None]]) -> None:
        """Record pins in etcd for the next leader: ``(key, checksum of the pinned version)``,
        or ``(key, None)`` to forget one. Raises :class:`TransportError` when etcd cannot
        be written (the caller answers UNAVAILABLE and the client retries)."""
        aetcd = _aetcd()
        try:
            client = await self._connect()
            tx = client.transactions
            ops = [tx.put(self._pins_prefix + key.hex().encode(), b"%d" % checksum) if checksum is not None
                   else tx.delete(self._pins_prefix + key.hex().encode()) for key, checksum in changes]
            for i in range(0, len(ops), _TXN_OPS):  # etcd's default --max-txn-ops is 128
                await client.transaction(compare=[], success=ops[i:i + _TXN_OPS], failure=[])
        except (aetcd.ClientError, OSError) as e:
            await self._drop_client()
            raise TransportError(f"etcd {self.target.url}: {e}") from e

    async def load_pins(self, attempts: int = 5) -> dict[bytes, int]:
        """Every pin recorded by :meth:`save_pins` (key -> checksum), tried ``attempts``
        times; empty (logged) when etcd cannot be read."""
        aetcd = _aetcd()
        for attempt in range(attempts):
            try:
                client = await self._connect()
                got = await client.get_prefix(self._pins_prefix)
                n = len(self._pins_prefix)
                return {bytes.fromhex(kv.key[n:].decode()): int(kv.value) for kv in got}
            except (aetcd.ClientError, OSError) as e:
                log.warning("master %s: reading pins from etcd failed (%s)%s", self.name, e,
                            "; retrying" if attempt + 1 < attempts else "")
                await self._drop_client()
                await asyncio.sleep(self.poll)
        log.error("master %s: pins recorded in etcd could not be read; objects pinned under the "
                  "previous leader are not pinned now", self.name)
        return {}

    async def resign(self) -> None:
        """Give the leadership up now (revoking the lease deletes the key): a standby
        takes over within ``poll`` seconds instead of a TTL."""
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        lease, self._lease = self._lease, None
        if lease is not None and not self.lost.is_set():
            try:
                await lease.revoke()
            except (_aetcd().ClientError, OSError) as e:
                log.warning("master %s: could not revoke its etcd lease (%s); it runs out in %ds",
                            self.name, e, self.ttl_s)
        self.lost.set()
        await self._drop_client()
