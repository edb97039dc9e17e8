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

import numpy as np
import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
)

from connectors.sglang.config import SGLangStoreConfig
from kvstore.client import Client
from kvstore.kernels.arrays import host_bytes
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

    def _pieces(self, keys: list[str], host_indices: torch.Tensor) -> list[Scattered]:
        ptrs, sizes = self.mem_pool_host.get_page_buffer_meta(host_indices)
        n = len(keys)
        if n == 0 or len(ptrs) % n or len(ptrs) != len(sizes):
            raise ValueError(f"host pool gave {len(ptrs)} page pieces for {n} pages")
        per = len(ptrs) // n
        return [Scattered(ptrs[i * per:(i + 1) * per], sizes[i * per:(i + 1) * per], owner=self.mem_pool_host)
                for i in range(n)]

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Read pages ``keys`` into the host pool slots ``host_indices`` (page i at
        ``host_indices[i * page_size]``); per page, whether it arrived verified."""
        if not keys:
            return []
        t0 = time.perf_counter()
        try:
            got = self.client.get_into_batch(self._keys(keys, "v1"), self._pieces(keys, host_indices),
                                             timeout=self.cfg.timeout)
        except Exception as e:  # noqa: BLE001 - a failed read is a miss; SGLang recomputes
            self._failed("read", len(keys), e)
            return [False] * len(keys)
        ok = [g is not None and g == self.page_bytes for g in got]
        self._count("get", "prefetch", len(keys), sum(ok), t0)
        return ok

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Store pages ``keys`` from the host pool slots ``host_indices``; per page, stored?
        A rank that is not the storage writer (MLA) stores nothing and reports success."""
        if not keys:
            return []
        if not self.is_writer:
            return [True] * len(keys)
        t0 = time.perf_counter()
        try:
            items = [(k, _gather(p)) for k, p in zip(self._keys(keys, "v1"), self._pieces(keys, host_indices),
                                                       strict=True)]
            stored = self.client.put_batch(items, timeout=self.cfg.timeout)
        except Exception as e:  # noqa: BLE001 - a failed write is reported per page, never raised
            self._failed("write", len(keys), e)
            return [False] * len(keys)
        ok = [bool(s) for s in stored]
        self._count("set", "backup", len(keys), sum(ok), t0)
        return ok

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
        return all(stored)

    # -- metrics, shutdown ------------------------------------------------------------

    def get_stats(self) -> Any:
        """SGLang's StorageMetrics since the last call (polled with ``--enable-storage-metrics``)."""
        from sglang.srt.observability.metrics_collector import StorageMetrics

        with self._lock:
            m, self._metrics = self._metrics, {k: [] for k in self._metrics}
        return StorageMetrics(**m)

    def close(self) -> None:
        self.client.close()

    def _count(self, op: str, kind: str, pages: int, good: int, t0: float) -> None:
        dt = max(time.perf_counter() - t0, 1e-9)
        with self._lock:
            self.counters[f"{op}_pages"] += pages
            self.counters["get_hits" if op == "get" else "set_stored"] += good
            self._metrics[f"{kind}_pgs"].append(good)
            self._metrics[f"{kind}_bandwidth"].append(good * self.page_bytes / dt / 1e9)

    def _failed(self, what: str, pages: int, e: BaseException) -> None:
        with self._lock:
            self.counters["errors"] += 1
        log.warning("kvstore HiCache %s of %d page(s) failed (treated as misses): %s: %s", what, pages,
                    type(e).__name__, e)


def _interface_v1(cfg: HiCacheStorageConfig) -> bool:
    v = (cfg.extra_config or {}).get("interface_v1")
    return bool(v) and str(v).lower() not in ("0", "false", "no")


def _gather(pieces: Scattered) -> np.ndarray:
    """One page's pieces as one contiguous array (the value to store)."""
    return np.concatenate([host_bytes(int(a), int(n)) for a, n in zip(pieces.addrs, pieces.lens, strict=True)])


def _bytes_of(t: Any) -> memoryview:
    """A CPU tensor's bytes, writable, without a copy."""
    if isinstance(t, torch.Tensor):
        if t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError("kvstore HiCache backend: flat pages must be contiguous CPU tensors")
        return memoryview(t.view(-1).view(torch.uint8).numpy().data)
    return memoryview(t).cast("B")


def _nbytes(t: Any) -> int:
    return int(t.numel() * t.element_size()) if isinstance(t, torch.Tensor) else len(memoryview(t).cast("B"))
