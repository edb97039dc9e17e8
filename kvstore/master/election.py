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

from kvstore.errors import InvalidArgument
from kvstore.master.discovery import EtcdTarget, leader_value

log = logging.getLogger(__name__)


def _aetcd() -> Any:
    try:
        import aetcd
    except ImportError as e:
        raise InvalidArgument("master.etcd needs aetcd: pip install 'kvstore[ha]'") from e
    return aetcd


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
