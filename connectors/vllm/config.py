"""Typed configuration of the vLLM connector, read from ``kv_connector_extra_config``.

Every key is optional except ``master``. Unknown keys stop the engine with a
message naming them (a typo must not silently disable a feature).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kvstore.client.breaker import Breaker
from kvstore.errors import ConfigError
from kvstore.tls import ClientTLS


@dataclass(frozen=True)
class ConnectorConfig:
    """Settings of one :class:`~connectors.vllm.KVStoreConnector` (both roles)."""

    master: str
    """``host:port`` of the kvstore master (gRPC)."""
    chunk_tokens: int = 256
    """Tokens per stored chunk; a multiple of vLLM's block size. Engines that
    share KV must use the same value (it is part of the key namespace)."""
    load_async: bool = False
    """``False``: loads run inside the step that needs them, layer by layer
    (``wait_for_layer_load(l)`` waits for layer ``l`` only). ``True``: the request
    waits outside the batch until its KV has arrived (vLLM's async-load path)."""
    load_inline: bool | None = None
    """Sync loads run on the model-runner thread inside ``start_load_kv`` (``True``) or on
    a loader thread the forward waits on layer by layer (``False``). Default (unset or
    ``"auto"``): inline for a host (CPU) KV cache, where a thread has no device compute to
    overlap with and only contends for the GIL; a thread for GPU caches."""
    timeout: float = 10.0
    """Seconds any one store call may take (lookup, load of one layer, save)."""
    lookup_timeout: float = 2.0
    """Seconds the scheduler waits for the master's prefix answer before
    treating the request as a miss."""
    handoff_wait: float = 5.0
    """P/D: seconds a consumer waits for chunks the producer announced in
    ``kv_transfer_params`` but has not finished storing yet."""
    token: str | None = None
    """Bearer token for the master and the nodes, if they require one (prefer ``token_file``)."""
    tls_ca: str | None = None
    """CA (PEM) verifying the master's and nodes' TLS certificates (``kvstore auth init --tls``)."""
    tls_cert: str | None = None
    """Client certificate (PEM) for a master and nodes that require one (mutual TLS,
    ``--tls-client-ca``); needs ``tls_ca`` and ``tls_key``."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert``."""
    token_file: str | None = None
    """File holding that token (a tenant's token from ``kvstore auth init``/``add-tenant``),
    so the secret stays out of the engine's command line and logs."""
    kernel_threads: int = 1
    """Threads of the gather/scatter kernels (the engine's own threads do the math)."""
    load_batch_bytes: int = 64 << 20
    """Sync loads fetch layer 0 alone (so the forward starts early), then as many
    further layers per store call as fit in this many bytes (fewer round trips
    when the forward is short, bounded staging memory when it is long)."""
    model_id: str | None = None
    """Model identity in the key namespace; default vLLM's served model path/name.
    Set it when two engines load the same weights from different paths."""
    breaker_threshold: int = 2
    """Consecutive failed calls to the master after which the connector stops asking it
    (lookups answer "no hit" at once, saves are dropped) for a back-off that doubles
    from 0.5 s up to ``breaker_max_backoff``; one probe at a time then tests it."""
    breaker_max_backoff: float = 30.0
    """Longest back-off of the breaker, seconds."""
    save_backlog_bytes: int = 1 << 30
    """Most bytes of gathered KV waiting for the save thread; a save that would go
    beyond is dropped (counter ``save_dropped_backlog``), never blocking the forward."""
    shutdown_flush_timeout: float = 4.0
    """Seconds shutdown (vLLM's, or the interpreter's exit) waits for queued saves
    before dropping the rest with a log line. vLLM force-kills its engine process
    5 s after asking it to stop (``VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS``), so keep it below."""

    def __post_init__(self) -> None:
        if not isinstance(self.master, str) or ":" not in self.master:
            raise ConfigError(f"kv_connector_extra_config.master must be 'host:port', got {self.master!r}")
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens <= 0:
            raise ConfigError(f"kv_connector_extra_config.chunk_tokens must be a positive int, "
                              f"got {self.chunk_tokens!r}")
        for name in ("timeout", "lookup_timeout"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"kv_connector_extra_config.{name} must be > 0")
        if float(self.handoff_wait) < 0:
            raise ConfigError("kv_connector_extra_config.handoff_wait must be >= 0")
        for name in ("load_batch_bytes", "save_backlog_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"kv_connector_extra_config.{name} must be a positive int (bytes), got {v!r}")
        if not isinstance(self.breaker_threshold, int) or self.breaker_threshold < 1:
            raise ConfigError("kv_connector_extra_config.breaker_threshold must be an int >= 1")
        if not float(self.breaker_max_backoff) >= 0.5:
            raise ConfigError("kv_connector_extra_config.breaker_max_backoff must be >= 0.5 (seconds)")
        if float(self.shutdown_flush_timeout) < 0:
            raise ConfigError("kv_connector_extra_config.shutdown_flush_timeout must be >= 0")
        if not 1 <= int(self.kernel_threads) <= 64:
            raise ConfigError("kv_connector_extra_config.kernel_threads must be in [1, 64]")
        ClientTLS.of(self.tls_ca, self.tls_cert, self.tls_key)  # a certificate without its key or a CA

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        """Build from vLLM's ``kv_connector_extra_config``; raises :class:`ConfigError`."""
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(f"kv_connector_extra_config: unknown key(s) {unknown}; known: {sorted(known)}")
        if "master" not in extra:
            raise ConfigError("kv_connector_extra_config.master is required ('127.0.0.1:PORT')")
        if "load_async" in extra:
            extra["load_async"] = _as_bool("load_async", extra["load_async"])
        if "load_inline" in extra:
            v = extra["load_inline"]
            extra["load_inline"] = None if v is None or v == "auto" else _as_bool("load_inline", v)
        if extra.get("token_file"):
            if extra.get("token"):
                raise ConfigError("kv_connector_extra_config: give token or token_file, not both")
            try:
                extra["token"] = Path(str(extra["token_file"])).read_text().strip()
            except OSError as e:
                raise ConfigError(f"kv_connector_extra_config.token_file {extra['token_file']}: "
                                  f"{e.strerror}") from e
            if not extra["token"]:
                raise ConfigError(f"kv_connector_extra_config.token_file {extra['token_file']} is empty")
        for name in ("timeout", "lookup_timeout", "handoff_wait", "shutdown_flush_timeout", "breaker_max_backoff"):
            if name in extra:
                extra[name] = _as_float(name, extra[name])
        for name in ("chunk_tokens", "kernel_threads", "load_batch_bytes", "save_backlog_bytes",
                     "breaker_threshold"):
            if name in extra:
                extra[name] = _as_int(name, extra[name])
        return cls(**extra)

    def breaker(self) -> Breaker:
        """A circuit breaker for the master with these settings."""
        return Breaker(threshold=self.breaker_threshold, base=0.5, cap=float(self.breaker_max_backoff))

    def check_block_size(self, block_size: int) -> None:
        if self.chunk_tokens % block_size:
            raise ConfigError(
                f"kv_connector_extra_config.chunk_tokens ({self.chunk_tokens}) must be a multiple "
                f"of vLLM's block size ({block_size})")


def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "0", "false", "no"):
        return v.lower() in ("1", "true", "yes")
    raise ConfigError(f"kv_connector_extra_config.{name} must be a boolean, got {v!r}")


def _as_float(name: str, v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"kv_connector_extra_config.{name} must be a number, got {v!r}") from e


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise ConfigError(f"kv_connector_extra_config.{name} must be an int, got {v!r}")
    try:
        return int(v)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"kv_connector_extra_config.{name} must be an int, got {v!r}") from e
