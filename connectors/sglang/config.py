"""Settings of the SGLang HiCache backend, read from ``--hicache-storage-backend-extra-config``.

SGLang hands the backend the whole extra-config dict, its own keys included
(``backend_name``, ``module_path``, ``class_name``, ``interface_v1``, ...), so
keys this backend does not know are passed over with a warning rather than
refused; the values of its own keys are checked, with errors naming the key.
Importable without SGLang.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvstore.errors import ConfigError
from kvstore.tls import ClientTLS

log = logging.getLogger(__name__)

SGLANG_KEYS = frozenset({
    "backend_name", "module_path", "class_name", "interface_v1", "file_storage_path",
    "prefetch_threshold", "prefetch_timeout_base", "prefetch_timeout_per_ki_token",
    "hicache_storage_pass_prefix_keys", "tp_lcm_size", "enable_metadata_cache", "metadata_ttl",
})
"""Keys SGLang itself reads from the same dict (not this backend's business)."""


@dataclass(frozen=True)
class SGLangStoreConfig:
    """This backend's keys of the extra config."""

    master: str
    """kvstore master: ``host:port`` or ``etcd://HOST:PORT[,..]/CLUSTER`` (standby masters)."""
    timeout: float = 5.0
    """Seconds one storage call may take (a batch of pages); past it the pages are misses."""
    token: str | None = None
    """Bearer token for the master and nodes, if they require one (prefer ``token_file``)."""
    token_file: str | None = None
    """File holding that token (``kvstore auth init`` / ``add-tenant``)."""
    tls_ca: str | None = None
    """CA (PEM) verifying the master's and nodes' TLS certificates."""
    tls_cert: str | None = None
    """Client certificate (PEM) where the master and nodes require one (mutual TLS)."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""
    namespace: str = ""
    """Extra text mixed into every page key: instances share pages only with the same
    namespace (the model, ranks and pool layout are always part of it)."""

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> SGLangStoreConfig:
        extra = dict(extra or {})
        mine = {"master", "timeout", "token", "token_file", "tls_ca", "tls_cert", "tls_key", "namespace"}
        unknown = sorted(set(extra) - mine - SGLANG_KEYS)
        if unknown:
            log.warning("kvstore HiCache backend: extra-config key(s) %s are neither kvstore's %s nor SGLang's; "
                        "ignored", unknown, sorted(mine))
        master = extra.get("master")
        if not isinstance(master, str) or not master or (":" not in master):
            raise ConfigError("hicache extra config 'master' is required: 'HOST:PORT' or "
                              f"'etcd://HOST:PORT/CLUSTER', got {master!r}")
        try:
            timeout = float(extra.get("timeout", 5.0))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"hicache extra config 'timeout' must be a number of seconds, "
                              f"got {extra.get('timeout')!r}") from e
        if not timeout > 0:
            raise ConfigError(f"hicache extra config 'timeout' must be > 0, got {timeout}")
        token = extra.get("token")
        if extra.get("token_file"):
            if token:
                raise ConfigError("hicache extra config: give 'token' or 'token_file', not both")
            path = Path(str(extra["token_file"]))
            try:
                token = path.read_text().strip()
            except OSError as e:
                raise ConfigError(f"hicache extra config 'token_file' {path}: {e.strerror}") from e
            if not token:
                raise ConfigError(f"hicache extra config 'token_file' {path} is empty")
        for name in ("token", "tls_ca", "tls_cert", "tls_key", "namespace"):
            v = extra.get(name)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"hicache extra config '{name}' must be a string, got {v!r}")
        tls: dict[str, str | None] = {name: extra.get(name) or None for name in ("tls_ca", "tls_cert", "tls_key")}
        for name, pem in tls.items():
            if pem and not Path(pem).is_file():
                raise ConfigError(f"hicache extra config '{name}' {pem}: no such file")
        ClientTLS.of(tls["tls_ca"], tls["tls_cert"], tls["tls_key"])  # a certificate without its key or a CA
        return cls(master=master, timeout=timeout, token=token or None, token_file=extra.get("token_file"),
                   namespace=str(extra.get("namespace") or ""), **tls)
