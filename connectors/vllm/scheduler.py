"""Scheduler side of the vLLM connector: prefix lookups, load plans, save plans.

Runs in vLLM's scheduler (engine-core process), single-threaded: vLLM calls
every method from its scheduling loop, so no locking is needed here.

Contracts (see vLLM's ``KVConnectorBase_V1``):

* :meth:`get_num_new_matched_tokens` asks the master how many leading chunks
  of the prompt the pool holds (``LongestPrefix``; it reads no data and takes
  no lease: side-effect free). A failure of the master counts as a miss.
* :meth:`update_state_after_alloc` turns a hit into a :class:`LoadSpec` once
  vLLM has allocated the blocks.
* :meth:`build_connector_meta` hands the step's loads, and the chunks whose
  tokens become complete in this step, to the worker side.
* :meth:`request_finished` keeps a request's blocks (returns ``True``) when
  any save was planned for it; the worker reports it in ``finished_sending``
  once its saves are done.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from connectors.vllm.config import ConnectorConfig
from connectors.vllm.events import EventGate
from connectors.vllm.metadata import KVStoreConnectorMetadata, KVStoreHandshake, LoadSpec, SaveSpec
from connectors.vllm.naming import RefusedRequest, chunk_extras, keys_for, namespace
from kvstore.client import Client
from kvstore.errors import KVStoreError

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

PARAMS_KEY = "kvstore"
"""Key of this connector's entry in ``kv_transfer_params``."""
_POLL_INTERVAL = 0.005


@dataclass
class _Tracked:
    """Per-request scheduler state."""

    request: Request
    hit_chunks: int = 0
    """Leading chunks the pool held at lookup time (never saved again)."""
    load_end: int = 0
    """End (tokens) of the load the last lookup offered."""
    next_save: int = 0
    """First chunk not yet planned for saving."""
    blocks: list[int] = field(default_factory=list)
    """The request's block table (group 0) as the scheduler sent it."""
    wait_since: float | None = None
    """P/D: when the consumer started waiting for announced chunks."""
    extras: list[bytes] = field(default_factory=list)
    """Per-chunk extra identity of the prompt's chunks (LoRA, multimodal items)."""
    refused: str = ""
    """Why the request is neither loaded nor saved (empty: it is served)."""


class SchedulerSide:
    """Scheduler half of :class:`~connectors.vllm.KVStoreConnector`."""

    def __init__(self, cfg: ConnectorConfig, block_size: int, *, load: bool, save: bool,
                 events: bool = False) -> None:
        self.cfg = cfg
        self.block_size = block_size
        self.load_enabled = load
        self.save_enabled = save
        self.events = EventGate() if events else None
        """Pool events for vLLM's KV-event publisher (``--kv-events-config``); None: off."""
        self.client = Client(cfg.master, timeout=cfg.timeout, token=cfg.token, tls_ca=cfg.tls_ca,
                             tls_cert=cfg.tls_cert, tls_key=cfg.tls_key)
        self.breaker = cfg.breaker()
        self.handshakes: list[KVStoreHandshake] = []
        self._reqs: dict[str, _Tracked] = {}
        self._loads: list[LoadSpec] = []
        self._saving: set[str] = set()
        self.counters: Counter[str] = Counter()

    # -- set-up ------------------------------------------------------------------------

    def set_handshakes(self, metadata: dict[int, Any]) -> None:
        """Workers' namespaces (one per tensor-parallel rank), from vLLM's handshake."""
        self.handshakes = [m for _, m in sorted(metadata.items()) if isinstance(m, KVStoreHandshake)]
        log.info("kvstore connector: %d worker namespace(s): %s", len(self.handshakes),
                 [h.model for h in self.handshakes])

    # -- lookups -----------------------------------------------------------------------

    def _track(self, request: Request) -> _Tracked:
        t = self._reqs.get(request.request_id)
        if t is None:
            t = self._reqs[request.request_id] = _Tracked(request)
            try:
                t.extras = chunk_extras(request, self.cfg.chunk_tokens,
                                        len(request.prompt_token_ids or []) // self.cfg.chunk_tokens)
            except RefusedRequest as e:
                t.refused = str(e)
                self.counters["refused_requests"] += 1
                log.debug("request %s is neither loaded nor saved: %s", request.request_id, e)
        return t

    def _lookup_chunks(self, t: _Tracked) -> int | None:
        """Leading chunks of the prompt present for every TP rank; ``None`` when the
        master could not be asked (an error, or the breaker is open): a miss."""
        request = t.request
        tokens = request.prompt_token_ids or []
        if not self.handshakes or len(tokens) < self.cfg.chunk_tokens or t.refused:
            return 0
        if not self.breaker.allow():
            self.counters["lookups_skipped_breaker"] += 1
            return None
        hit = None
        try:
            for hs in self.handshakes:
                ns = namespace(hs, self.cfg.chunk_tokens, request.cache_salt)
                n = self.client.longest_prefix(keys_for(ns, tokens, t.extras), timeout=self.cfg.lookup_timeout)
                hit = n if hit is None else min(hit, n)
        except KVStoreError as e:
            self.counters["lookup_errors"] += 1
            self.breaker.failure()
            log.warning("kvstore lookup for request %s failed (treated as a miss%s): %s", request.request_id,
                        "; not asking the master for a while" if self.breaker.is_open else "", e)
            return None
        self.breaker.success()
        return hit or 0

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` loadable from the pool, and whether async.

        ``None`` asks vLLM to retry later (a P/D consumer waiting for chunks the
        producer announced). On a full prompt hit the last token is left for
        vLLM to recompute: sync loads stop at the last block boundary before
        it; async loads may cover it (vLLM recomputes that token itself).
        """
        rid = request.request_id
        t = self._track(request)
        found = self._lookup_chunks(t)
        hit = found or 0
        self.counters["lookups"] += 1
        expected = _announced_chunks(request)
        if (self.load_enabled and found is not None and expected is not None and hit < expected
                and self.cfg.handoff_wait > 0):
            now = time.monotonic()
            if t.wait_since is None:
                t.wait_since = now
            if now - t.wait_since < self.cfg.handoff_wait:
                time.sleep(_POLL_INTERVAL)  # vLLM polls again next step; don't spin the master
                return None, False
            self.counters["handoff_wait_expired"] += 1
            log.warning("request %s: producer announced %d chunk(s), %d present after %.1fs; "
                        "recomputing the rest", rid, expected, hit, self.cfg.handoff_wait)
        t.hit_chunks = hit
        t.next_save = max(t.next_save, hit)
        if not self.load_enabled or hit == 0:
            return 0, False
        n = request.num_tokens
        end = hit * self.cfg.chunk_tokens
        if not self.cfg.load_async:
            end = min(end, (n - 1) // self.block_size * self.block_size)
        ext = end - num_computed_tokens
        if ext <= 0:
            return 0, False
        t.load_end = end
        return ext, self.cfg.load_async

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        """Plan the load of the ``num_external_tokens`` vLLM accepted, into the blocks it allocated."""
        if num_external_tokens <= 0:
            return
        t = self._reqs[request.request_id]
        end = t.load_end
        start = end - num_external_tokens
        bs, c = self.block_size, self.cfg.chunk_tokens
        block_ids = list(blocks.get_block_ids()[0])
        last_chunk_end = -(-end // c) * c
        self._loads.append(LoadSpec(
            req_id=request.request_id, tokens=list((request.prompt_token_ids or [])[:last_chunk_end]),
            cache_salt=request.cache_salt or "", start=start, end=end,
            block_ids=block_ids[start // bs: end // bs], is_async=self.cfg.load_async,
            extras=t.extras[: last_chunk_end // c], block_hashes=self._hashes(request, last_chunk_end)))
        self.counters["load_requests"] += 1
        self.counters["load_tokens"] += num_external_tokens

    # -- per step ----------------------------------------------------------------------

    def build_connector_meta(self, out: SchedulerOutput) -> KVStoreConnectorMetadata:
        """This step's loads and saves; resets the pending loads."""
        meta = KVStoreConnectorMetadata(loads=self._loads)
        self._loads = []
        if not self.save_enabled:
            return meta
        for new in out.scheduled_new_reqs:
            t = self._reqs.get(new.req_id)
            if t is None:
                continue
            t.blocks = list(new.block_ids[0])
            self._plan_save(meta, t, new.num_computed_tokens + out.num_scheduled_tokens.get(new.req_id, 0))
        cached = out.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            t = self._reqs.get(rid)
            if t is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                t.blocks = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                t.blocks.extend(new_ids[0])
            self._plan_save(meta, t, cached.num_computed_tokens[i] + out.num_scheduled_tokens.get(rid, 0))
        return meta

    def _plan_save(self, meta: KVStoreConnectorMetadata, t: _Tracked, computed_after: int) -> None:
        req = t.request
        if t.refused:
            return
        prompt = req.prompt_token_ids or []
        c = self.cfg.chunk_tokens
        done = min(computed_after, len(prompt)) // c
        if done <= t.next_save:
            return
        bpc = c // self.block_size
        if len(t.blocks) < done * bpc:  # vLLM always allocates before scheduling; be safe
            done = len(t.blocks) // bpc
            if done <= t.next_save:
                return
        meta.saves.append(SaveSpec(
            req_id=req.request_id, tokens=list(prompt[: done * c]), cache_salt=req.cache_salt or "",
            first_chunk=t.next_save, num_chunks=done - t.next_save,
            block_ids=t.blocks[t.next_save * bpc: done * bpc], extras=t.extras[:done],
            block_hashes=self._hashes(req, done * c)))
        self.counters["save_chunks"] += done - t.next_save
        t.next_save = done
        self._saving.add(req.request_id)

    def _hashes(self, request: Request, tokens: int) -> list[Any]:
        """vLLM's block hashes of the request's first ``tokens`` tokens, as its KV events
        carry them; empty when events are off."""
        if self.events is None:
            return []
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        return [maybe_convert_block_hash(h) for h in request.block_hashes[: tokens // self.block_size]]

    # -- KV events ---------------------------------------------------------------------

    def add_events(self, events: list[Any]) -> None:
        """The workers' pool events of one step (see :mod:`connectors.vllm.events`)."""
        if self.events is None or not events:
            return
        # A chunk is in the pool once every rank holding its own copy stored it (MLA: one copy).
        ranks = len({h.tp_rank for h in self.handshakes}) or 1
        self.events.add(events, ranks)

    def take_events(self) -> list[Any]:
        if self.events is None:
            return []
        out = self.events.take()
        self.counters["events"] += len(out)
        self.counters["events_dropped"] = self.events.dropped
        return out

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Keep the blocks while planned saves run; announce stored chunks to a P/D consumer."""
        rid = request.request_id
        t = self._reqs.pop(rid, None)
        delay = rid in self._saving
        self._saving.discard(rid)
        params = None
        if self.save_enabled and t is not None:
            params = {PARAMS_KEY: {"chunks": t.next_save, "chunk_tokens": self.cfg.chunk_tokens}}
        return delay, params

    def shutdown(self) -> None:
        self.client.close()


def _announced_chunks(request: Request) -> int | None:
    params = getattr(request, "kv_transfer_params", None)
    if not isinstance(params, dict):
        return None
    mine = params.get(PARAMS_KEY)
    if not isinstance(mine, dict) or not isinstance(mine.get("chunks"), int):
        return None
    return int(mine["chunks"])
