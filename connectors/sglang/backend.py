"""kvstore as SGLang's HiCache L3 storage: pages by their SGLang hash, zero-copy into the host pool.

SGLang's hierarchical cache keeps KV pages in GPU memory, then in a host-memory
pool, then in an L3 storage backend shared by instances. SGLang loads this class
through its ``dynamic`` backend::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "kvstore",
        "module_path": "connectors.sglang", "class_name": "KVStoreHiCacheStorage",
        "interface_v1": 1, "master": "127.0.0.1:5555"}'

One page (``page_size`` tokens, every layer of this rank) is one kvstore object
under ``sgl/<namespace>/<page hash>``; the namespace hashes the model name, the
ranks whose KV differs (TP, PP, context parallel; not TP for MLA, whose latent
cache every rank shares and only the storage-writer rank stores), the host pool's
layout, dtype and page geometry, and the optional ``namespace`` key, so pages
are shared exactly between instances that would compute the same bytes.

With ``interface_v1`` (recommended) reads land straight in the host pool's page
slabs (``get_page_buffer_meta``; one verified copy on the same host) and writes
store each page from them; without it SGLang's flat-page calls (``batch_get`` /
``batch_set``) are served, under a namespace of their own (the byte order of a
flat page differs). ``batch_exists`` is the master's ``LongestPrefix``. Every
failure is a miss (SGLang recomputes), never an exception into SGLang's threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from connectors.sglang.config import SGLangStoreConfig
from kvstore.client import Client
from kvstore.scatter import Scattered

log = logging.getLogger(__name__)


def page_namespace(storage: HiCacheStorageConfig, pool: Any, api: str, extra: str = "") -> str:
    """16 hex digits naming who may share a page's bytes (see the module docstring)."""
    mla = bool(storage.is_mla_model)
    ident = {
        "v": 1, "api": api, "model": storage.model_name or "", "mla": mla,
        "tp": None if mla else [storage.tp_rank, storage.tp_size],
        "pp": [storage.pp_rank, storage.pp_size],
        "cp": [storage.attn_cp_rank, storage.attn_cp_size],
        "layout": getattr(pool, "layout", ""), "dtype": str(getattr(pool, "dtype", "")),
        "page_size": int(pool.page_size), "layers": int(getattr(pool, "layer_num", 0)),
        "bytes_per_token": int(pool.get_size_per_token()), "extra": extra,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


class KVStoreHiCacheStorage(HiCacheStorage):  # type: ignore[misc]
    """SGLang ``HiCacheStorage`` over a kvstore pool (see the module docstring)."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        self.storage_config = storage_config
        self.cfg = SGLangStoreConfig.from_extra(storage_config.extra_config)
        self.is_writer = bool(storage_config.is_storage_writer)
        self.client = Client(self.cfg.master, timeout=self.cfg.timeout, token=self.cfg.token, tls_ca=self.cfg.tls_ca,
                             tls_cert=self.cfg.tls_cert, tls_key=self.cfg.tls_key, cache_locations=True)
        self.mem_pool_host: Any = None
        self.page_bytes = 0
        self._prefix = {"v1": b"", "flat": b""}
        self._pools: dict[str, tuple[Any, bytes]] = {}  # v2: name -> (host pool, key prefix)
        self._lock = threading.Lock()
        self._metrics: dict[str, list[float]] = {"prefetch_pgs": [], "backup_pgs": [], "prefetch_bandwidth": [],
                                                  "backup_bandwidth": []}
        self.counters: dict[str, int] = {"get_pages": 0, "get_hits": 0, "set_pages": 0, "set_stored": 0,
                                         "errors": 0}
        log.info("kvstore HiCache backend: master %s, rank tp%d/%d pp%d/%d, %s", self.cfg.master,
                 storage_config.tp_rank, storage_config.tp_size, storage_config.pp_rank, storage_config.pp_size,
                 "storage writer" if self.is_writer else "reader only (MLA, not the writer rank)")

    # -- set-up ------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        super().register_mem_pool_host(mem_pool_host)
        pool = mem_pool_host
        self.page_size = int(pool.page_size)
        self.page_bytes = int(pool.get_size_per_token()) * self.page_size
        for api in ("v1", "flat"):
            ns = page_namespace(self.storage_config, pool, api, self.cfg.namespace)
            self._prefix[api] = f"sgl/{ns}/".encode()
        log.info("kvstore HiCache backend: host pool %s layout %s, %d B per page, namespace %s",
                 type(pool).__name__, getattr(pool, "layout", "?"), self.page_bytes, self._prefix["v1"].decode())

    def _keys(self, keys: list[str], api: str) -> list[bytes]:
        if self.mem_pool_host is None:
            raise RuntimeError("kvstore HiCache backend: register_mem_pool_host was not called")
        p = self._prefix[api]
        return [p + k.encode() for k in keys]

    # -- zero-copy page I/O (interface_v1) --------------------------------------------

    @staticmethod
    def _pieces(pool: Any, keys: list[Any], host_indices: torch.Tensor) -> list[Scattered]:
        ptrs, sizes = pool.get_page_buffer_meta(host_indices)
        n = len(keys)
        if n == 0 or len(ptrs) % n or len(ptrs) != len(sizes):
            raise ValueError(f"host pool gave {len(ptrs)} page pieces for {n} pages")
        per = len(ptrs) // n
        return [Scattered(ptrs[i * per:(i + 1) * per], sizes[i * per:(i + 1) * per], owner=pool)
                for i in range(n)]

    def _read(self, pool: Any, keys: list[bytes], host_indices: torch.Tensor) -> list[bool]:
        """Pages ``keys`` into ``pool``'s slots ``host_indices``; per page, arrived verified?"""
        t0 = time.perf_counter()
        try:
            dests = self._pieces(pool, keys, host_indices)
            got = self.client.get_into_batch(keys, dests, timeout=self.cfg.timeout)
        except Exception as e:  # noqa: BLE001 - a failed read is a miss; SGLang recomputes
            self._failed("read", len(keys), e)
            return [False] * len(keys)
        ok = [g is not None and g == len(d) for g, d in zip(got, dests, strict=True)]
        self._count("get", "prefetch", len(keys), sum(ok), t0, sum(len(d) for d, o in zip(dests, ok, strict=True) if o))
        return ok

    def _write(self, pool: Any, keys: list[bytes], host_indices: torch.Tensor) -> list[bool]:
        """Pages ``keys`` from ``pool``'s slots ``host_indices``; per page, in the pool now?
        (A page that was there already counts as stored.)"""
        if not self.is_writer:
            return [True] * len(keys)
        t0 = time.perf_counter()
        try:
            # each page straight from its slabs (no gather): copied piece by piece into the
            # node's arena on the same host, sent piece by piece to other hosts
            items = list(zip(keys, self._pieces(pool, keys, host_indices), strict=True))
            stored = self.client.put_batch(items, timeout=self.cfg.timeout)
        except Exception as e:  # noqa: BLE001 - a failed write is reported per page, never raised
            self._failed("write", len(keys), e)
            return [False] * len(keys)
        self._count("set", "backup", len(keys), sum(stored), t0,
                    sum(len(v) for (_, v), st in zip(items, stored, strict=True) if st))
        return [True] * len(keys)  # put_batch raised unless every page was stored or present

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Read pages ``keys`` into the host pool slots ``host_indices`` (page i at
        ``host_indices[i * page_size]``); per page, whether it arrived verified."""
        if not keys:
            return []
        return self._read(self.mem_pool_host, self._keys(keys, "v1"), host_indices)

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Store pages ``keys`` from the host pool slots ``host_indices``; per page, in the
        pool? A rank that is not the storage writer (MLA) stores nothing and reports success."""
        if not keys:
            return []
        return self._write(self.mem_pool_host, self._keys(keys, "v1"), host_indices)

    # -- hybrid models: several host pools (v2) ----------------------------------------

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """An extra host pool (Mamba/SWA state, DSA indexer, ...): its pages get keys under a
        namespace of their own (the pool's name and geometry); the ``kv`` pool shares the
        v1 pages."""
        super().register_mem_host_pool_v2(host_pool, host_pool_name)
        name = str(host_pool_name)
        ns = page_namespace(self.storage_config, host_pool, f"v2:{name}", self.cfg.namespace)
        self._pools[name] = (host_pool, f"sgl/{ns}/".encode())
        log.info("kvstore HiCache backend: host pool %r (%s), namespace sgl/%s/", name, type(host_pool).__name__, ns)

    def _pool(self, name: Any) -> tuple[Any, bytes]:
        key = str(name)
        if key in self._pools:
            return self._pools[key]
        if key == "kv" and self.mem_pool_host is not None:
            return self.mem_pool_host, self._prefix["v1"]
        raise ValueError(f"host pool {key!r} was not registered (register_mem_host_pool_v2)")

    def _pool_keys(self, name: Any, keys: list[str]) -> tuple[Any, list[bytes]]:
        pool, prefix = self._pool(name)
        return pool, [prefix + k.encode() for k in keys]

    def batch_exists_v2(self, keys: list[str], pool_transfers: list[Any] | None = None,
                        extra_info: HiCacheStorageExtraInfo | None = None) -> Any:
        """The usable prefix over the KV pages and every extra pool's hit policy:
        ``ALL_PAGES`` (each page of the prefix must be there), ``TRAILING_PAGES`` (only the
        ``len(transfer.keys)`` pages that end the prefix: a prefix length works when that
        window is complete, so the result lists every restorable length), and
        ``BLOCK_GROUPS`` (reported for no pool and never gating the KV hit: its geometry
        is not implemented here). Failures count as misses."""
        from sglang.srt.mem_cache.hicache_storage import PoolHitPolicy, PoolTransferResult

        kv_pages = self.batch_exists(keys, extra_info)
        hits: dict[Any, int] = {"kv": kv_pages} if kv_pages else {}
        restorable = list(range(1, kv_pages + 1))
        for t in pool_transfers or []:
            if not restorable:
                break
            if t.hit_policy == PoolHitPolicy.BLOCK_GROUPS:
                continue
            try:
                _, pkeys = self._pool_keys(t.name, keys[:kv_pages])
                present = self.client.exists_batch(pkeys, timeout=self.cfg.timeout)
            except Exception as e:  # noqa: BLE001 - unknown = not there
                self._failed("lookup", kv_pages, e)
                present = [False] * kv_pages
            if t.hit_policy == PoolHitPolicy.TRAILING_PAGES:
                window = max(1, len(t.keys or ()))
                usable = [n for n in range(1, kv_pages + 1) if all(present[max(0, n - window):n])]
                boundary = usable[-1] if usable else 0
            else:  # ALL_PAGES
                boundary = present.index(False) if False in present else kv_pages
                usable = list(range(1, boundary + 1))
            if boundary:
                hits[t.name] = boundary
            usable_set = set(usable)
            restorable = [n for n in restorable if n in usable_set]
        return PoolTransferResult(restorable[-1] if restorable else 0, hits, restorable)

    def _io_v2(self, transfers: list[Any], write: bool) -> dict[Any, list[bool]]:
        out: dict[Any, list[bool]] = {}
        for t in transfers:
            keys = list(t.keys or [])
            if not keys:
                out[t.name] = []
                continue
            try:
                pool, pkeys = self._pool_keys(t.name, keys)
            except ValueError as e:
                self._failed("write" if write else "read", len(keys), e)
                out[t.name] = [False] * len(keys)
                continue
            out[t.name] = self._write(pool, pkeys, t.host_indices) if write else \
                self._read(pool, pkeys, t.host_indices)
        return out

    def batch_get_v2(self, transfers: list[Any],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> dict[Any, list[bool]]:
        """Each transfer's pages (its pool's keys) into its host pool's slots; per pool, per page."""
        return self._io_v2(transfers, write=False)

    def batch_set_v2(self, transfers: list[Any],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> dict[Any, list[bool]]:
        """Each transfer's pages from its host pool's slots; per pool, per page in the pool?"""
        return self._io_v2(transfers, write=True)

    # -- prefix existence -------------------------------------------------------------

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading pages of ``keys`` the pool holds (the master's LongestPrefix)."""
        if not keys:
            return 0
        api = "v1" if _interface_v1(self.storage_config) else "flat"
        try:
            return int(self.client.longest_prefix(self._keys(keys, api), timeout=self.cfg.timeout))
        except Exception as e:  # noqa: BLE001 - unknown = not there
            self._failed("lookup", len(keys), e)
            return 0

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    # -- flat pages (SGLang without interface_v1) -------------------------------------

    def get(self, key: str, target_location: Any = None, target_sizes: Any = None) -> torch.Tensor | None:
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    def batch_get(self, keys: list[str], target_locations: Any = None,
                  target_sizes: Any = None) -> list[torch.Tensor | None]:
        """Flat pages into ``target_locations`` (SGLang's dummy pages); None per miss."""
        if not keys:
            return []
        t0 = time.perf_counter()
        targets = list(target_locations) if target_locations is not None else [
            self.mem_pool_host.get_dummy_flat_data_page() for _ in keys]
        try:
            views = [_bytes_of(t) for t in targets]
            got = self.client.get_into_batch(self._keys(keys, "flat"), views, timeout=self.cfg.timeout)
        except Exception as e:  # noqa: BLE001 - a failed read is a miss
            self._failed("read", len(keys), e)
            return [None] * len(keys)
        out = [t if g is not None and g == _nbytes(t) else None for t, g in zip(targets, got, strict=True)]
        self._count("get", "prefetch", len(keys), sum(o is not None for o in out), t0)
        return out

    def set(self, key: str, value: Any = None, target_location: Any = None, target_sizes: Any = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any = None, target_locations: Any = None,
                  target_sizes: Any = None) -> bool:
        if not keys:
            return True
        if not self.is_writer:
            return True
        t0 = time.perf_counter()
        try:
            items = [(k, _bytes_of(v)) for k, v in zip(self._keys(keys, "flat"), values, strict=True)]
            stored = self.client.put_batch(items, timeout=self.cfg.timeout)
        except Exception as e:  # noqa: BLE001 - reported as not stored
            self._failed("write", len(keys), e)
            return False
        self._count("set", "backup", len(keys), sum(bool(s) for s in stored), t0)
        return True  # put_batch raised unless every page was stored or already present

    # -- metrics, shutdown ------------------------------------------------------------

    def get_stats(self) -> Any:
        """SGLang's StorageMetrics since the last call (polled with ``--enable-storage-metrics``)."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        with self._lock:
            m, self._metrics = self._metrics, {k: [] for k in self._metrics}
        return StorageMetrics(**m)

    def close(self) -> None:
        self.client.close()

    def _count(self, op: str, kind: str, pages: int, good: int, t0: float, nbytes: int | None = None) -> None:
        """``good`` of ``pages`` pages moved (``nbytes`` bytes; default: KV pages' worth)."""
        dt = max(time.perf_counter() - t0, 1e-9)
        with self._lock:
            self.counters[f"{op}_pages"] += pages
            self.counters["get_hits" if op == "get" else "set_stored"] += good
            self._metrics[f"{kind}_pgs"].append(good)
            moved = good * self.page_bytes if nbytes is None else nbytes
            self._metrics[f"{kind}_bandwidth"].append(moved / dt / 1e9)

    def _failed(self, what: str, pages: int, e: BaseException) -> None:
        with self._lock:
            self.counters["errors"] += 1
        log.warning("kvstore HiCache %s of %d page(s) failed (treated as misses): %s: %s", what, pages,
                    type(e).__name__, e)


def _interface_v1(cfg: HiCacheStorageConfig) -> bool:
    v = (cfg.extra_config or {}).get("interface_v1")
    return bool(v) and str(v).lower() not in ("0", "false", "no")


def _bytes_of(t: Any) -> memoryview:
    """A CPU tensor's bytes, writable, without a copy."""
    if isinstance(t, torch.Tensor):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("kvstore HiCache backend: flat pages must be contiguous CPU tensors")
        return memoryview(t.view(-1).view(torch.uint8).numpy().data)
    return memoryview(t).cast("B")


def _nbytes(t: Any) -> int:
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else len(memoryview(t).cast("B"))
