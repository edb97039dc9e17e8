"""Typed configuration: frozen dataclasses, loaded from a TOML file plus overrides.

Sizes take human units (``"4GiB"``), durations too (``"30s"``). Every value is
validated when the config is built; a bad one raises :class:`ConfigError` naming
the key (``store.dram``), so a daemon stops at start-up instead of misbehaving.
Environment variables are not read here: they are for process plumbing only.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from kvstore.errors import ConfigError, InvalidArgument
from kvstore.units import parse_duration, parse_size

Toggle = Literal["auto", "on", "off"]
_TOGGLES = ("auto", "on", "off")


def _size(default: str | int, doc: str) -> Any:
    return field(default=default, metadata={"unit": "size", "doc": doc})


@dataclass(frozen=True)
class StoreConfig:
    """The node-local tiered store (DRAM arena + optional disk tier)."""

    dram: int = _size("1GiB", "Capacity of the DRAM tier (the host arena).")
    disk_dir: Path | None = field(
        default=None, metadata={"doc": "Directory of the disk tier; no disk tier when unset. One owner: the "
                                       "node locks its data file, and a second process on the same "
                                       "directory refuses to start."}
    )
    disk: int = _size("4GiB", "Capacity of the disk tier's preallocated data file.")
    high_watermark: float = field(
        default=0.95, metadata={"doc": "DRAM use fraction above which LRU chunks are demoted."}
    )
    low_watermark: float = field(
        default=0.85, metadata={"doc": "Demotion stops once DRAM use falls below this fraction."}
    )
    alignment: int = _size(4096, "Allocation granularity in bytes (a power of two >= 512).")
    pin_memory: Toggle = field(
        default="auto", metadata={"doc": "Page-lock the arena with CUDA: auto = when CUDA is present."}
    )
    prefault: bool = field(
        default=True, metadata={"doc": "Fault in arena pages at start (steady latency, slower start)."}
    )
    disk_direct_io: Toggle = field(
        default="auto", metadata={"doc": "O_DIRECT disk I/O: auto = when the filesystem allows it."}
    )
    disk_sync: bool = field(
        default=True, metadata={"doc": "fdatasync data and sync the index before a put returns."}
    )
    write_through: bool = field(
        default=False,
        metadata={"doc": "Also write every put to the disk tier before returning (survives restarts)."},
    )
    promote_on_hit: bool = field(
        default=True, metadata={"doc": "Copy chunks read from disk back into DRAM."}
    )
    hbm: int = _size(0, "Capacity of the HBM tier (GPU memory above DRAM; CUDA values put into an "
                        "embedded LocalStore land there); 0 = no HBM tier. Needs CuPy and a GPU.")
    hbm_device: int = field(default=0, metadata={"doc": "CUDA device index of the HBM tier."})

    def __post_init__(self) -> None:
        _coerce_units(self, "store")
        if self.dram <= 0:
            raise ConfigError("store.dram must be > 0")
        if self.hbm < 0 or 0 < self.hbm < self.alignment:
            raise ConfigError(f"store.hbm must be 0 (no HBM tier) or at least {self.alignment} bytes, got {self.hbm}")
        if self.hbm_device < 0:
            raise ConfigError(f"store.hbm_device must be a CUDA device index >= 0, got {self.hbm_device}")
        if self.alignment < 512 or self.alignment & (self.alignment - 1):
            raise ConfigError(f"store.alignment must be a power of two >= 512, got {self.alignment}")
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ConfigError(
                "store.low_watermark and store.high_watermark must satisfy "
                f"0 < low <= high <= 1, got low={self.low_watermark} high={self.high_watermark}"
            )
        for name in ("pin_memory", "disk_direct_io"):
            if getattr(self, name) not in _TOGGLES:
                raise ConfigError(f"store.{name} must be one of {_TOGGLES}, got {getattr(self, name)!r}")
        if self.disk_dir is not None:
            object.__setattr__(self, "disk_dir", Path(self.disk_dir))
            if self.disk < self.alignment:
                raise ConfigError(f"store.disk must be at least {self.alignment} bytes, got {self.disk}")


def _duration(default: str | float, doc: str) -> Any:
    return field(default=default, metadata={"unit": "duration", "doc": doc})


@dataclass(frozen=True)
class MasterConfig:
    """The metadata master (``kvstore master``): address, limits, timing, persistence."""

    host: str = field(
        default="127.0.0.1",
        metadata={"doc": "Address the gRPC service binds; 0.0.0.0 exposes it (set master.token_file)."},
    )
    port: int = field(default=5555, metadata={"doc": "gRPC port; 0 picks a free port (printed at start)."})
    fast_port: int = field(
        default=0,
        metadata={"doc": "Port of the framed channel serving the same calls to clients' hot paths "
                         "(advertised through Hello); 0 picks a free port, -1 disables."},
    )
    metrics_port: int = field(
        default=0,
        metadata={"doc": "Prometheus /metrics HTTP port on master.host; 0 picks a free port, -1 disables."},
    )
    data_dir: Path | None = field(
        default=None,
        metadata={"doc": "RocksDB directory for objects and nodes; unset keeps state in memory only."},
    )
    node_ttl: float = _duration("10s", "A node silent this long is dead: its replicas vanish.")
    heartbeat_interval: float = _duration("2s", "How often nodes heartbeat (told at registration).")
    put_ttl: float = _duration("30s", "A PutStart reservation not ended within this lapses (at least 2s).")
    lease_ttl: float = _duration("5s", "How long a Lookup read lease holds keys against removal.")
    max_message: int = _size("64MiB", "Largest gRPC message accepted or sent.")
    max_batch: int = field(default=65536, metadata={"doc": "Most items (keys) in one request."})
    max_replicas: int = field(default=8, metadata={"doc": "Most replicas one PutStart may ask for."})
    max_concurrent_rpcs: int = field(
        default=1024,
        metadata={"doc": "gRPC calls served at once; more are refused with RESOURCE_EXHAUSTED (callers retry)."},
    )
    max_fast_connections: int = field(
        default=4096,
        metadata={"doc": "Open connections on the framed channel; more are closed at once (clients fall "
                         "back to gRPC)."},
    )
    events_window: int = field(
        default=100_000,
        metadata={"doc": "Events the master keeps for subscribers that reconnect (Events.Watch); one "
                         "that falls further behind gets a RESYNC event."},
    )
    token_file: Path | None = field(
        default=None,
        metadata={"doc": "File holding a shared token; RPCs must send 'authorization: Bearer <token>'."},
    )
    tls_cert: Path | None = field(
        default=None,
        metadata={"doc": "PEM certificate (chain) the gRPC port and framed channel serve TLS with "
                         "(`kvstore auth init --tls` makes one); unset: plain TCP."},
    )
    tls_key: Path | None = field(default=None, metadata={"doc": "PEM private key of master.tls_cert."})
    tls_client_ca: Path | None = field(
        default=None,
        metadata={"doc": "Mutual TLS: CA (PEM) whose certificates clients and nodes must present on the "
                         "gRPC port and framed channel; unset: no client certificate asked. Needs master.tls_cert."},
    )
    auth_dir: Path | None = field(
        default=None,
        metadata={"doc": "Credentials directory from `kvstore auth init`: tokens per role (admin, node, "
                         "client per tenant); re-read when it changes. Exclusive with master.token_file."},
    )
    sync_writes: bool = field(
        default=False,
        metadata={"doc": "fsync the RocksDB WAL on every change (power-loss safe, slower)."},
    )
    insecure: bool = field(
        default=False,
        metadata={"doc": "Serve a non-loopback master.host without master.token_file (protected mode "
                         "refuses that by default)."},
    )
    etcd: str | None = field(
        default=None,
        metadata={"doc": "etcd endpoints HOST:PORT[,HOST:PORT] to elect the leader of master.cluster "
                         "among several masters (the others wait as standbys); unset runs one master."},
    )
    cluster: str = field(
        default="default",
        metadata={"doc": "Name of the cluster of masters in etcd; nodes and clients then use "
                         "etcd://HOST:PORT/NAME as the master address."},
    )
    leader_ttl: float = _duration("3s", "The leader's etcd lease: a standby takes over this long "
                                        "after the leader dies or stalls (whole seconds, >= 2s).")
    advertise: str | None = field(
        default=None,
        metadata={"doc": "host:port the leader publishes in etcd for nodes and clients; default "
                         "master.host and the bound port (required when master.host is a wildcard)."},
    )

    def __post_init__(self) -> None:
        _coerce_units(self, "master")
        for name in ("port", "max_batch", "max_replicas", "events_window", "max_concurrent_rpcs",
                     "max_fast_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"master.{name} must be an integer, got {value!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"master.port must be in 0..65535, got {self.port}")
        for name in ("metrics_port", "fast_port"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= 65535:
                raise ConfigError(f"master.{name} must be -1 (off) or 0..65535, got {value!r}")
        if self.node_ttl < 0.1:
            raise ConfigError(f"master.node_ttl must be >= 100ms, got {self.node_ttl}s")
        if not 0 < self.heartbeat_interval <= self.node_ttl / 2:
            raise ConfigError(
                f"master.heartbeat_interval must be > 0 and <= master.node_ttl / 2 "
                f"(so one lost heartbeat does not kill a node), got {self.heartbeat_interval}s "
                f"with node_ttl {self.node_ttl}s"
            )
        if self.put_ttl < 2:  # clients post a PutEnd only within 1 s of its PutStart
            raise ConfigError(f"master.put_ttl must be >= 2s, got {self.put_ttl}s")
        if self.lease_ttl <= 0:
            raise ConfigError("master.lease_ttl must be > 0")
        if self.token_file is not None and self.auth_dir is not None:
            raise ConfigError("master.token_file and master.auth_dir are exclusive: one shared token, "
                              "or a credentials directory with a token per role")
        if self.leader_ttl < 2 or self.leader_ttl != int(self.leader_ttl):
            raise ConfigError(f"master.leader_ttl must be whole seconds, at least 2s (an etcd lease), "
                              f"got {self.leader_ttl}s")
        if self.etcd is not None:
            from kvstore.master.discovery import check_cluster, parse_endpoints

            try:
                parse_endpoints(self.etcd)
                check_cluster(self.cluster)
            except ValueError as e:
                raise ConfigError(f"master.etcd / master.cluster: {e}") from e
        if self.max_message < 1 << 20:
            raise ConfigError(f"master.max_message must be at least 1MiB, got {self.max_message}")
        if self.max_batch < 1:
            raise ConfigError(f"master.max_batch must be >= 1, got {self.max_batch}")
        if self.max_replicas < 1:
            raise ConfigError(f"master.max_replicas must be >= 1, got {self.max_replicas}")
        if self.max_concurrent_rpcs < 1 or self.max_fast_connections < 1:
            raise ConfigError("master.max_concurrent_rpcs and master.max_fast_connections must be >= 1")
        if self.events_window < 1:
            raise ConfigError(f"master.events_window must be >= 1, got {self.events_window}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("master.tls_cert and master.tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("master.tls_client_ca (mutual TLS) needs master.tls_cert and master.tls_key")
        for name in ("data_dir", "token_file", "auth_dir", "tls_cert", "tls_key", "tls_client_ca"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))


@dataclass(frozen=True)
class NodeConfig:
    """A store node: identity, listen addresses, transports, timers."""

    node_id: str = field(default="", metadata={"doc": "Stable node name; default: hostname-port."})
    master: str = field(default="127.0.0.1:5555",
                        metadata={"doc": "Master address host:port, or etcd://HOST:PORT[,HOST:PORT]/CLUSTER "
                                         "to follow the leader of a cluster of masters."})
    host: str = field(default="127.0.0.1", metadata={"doc": "Address the node's services bind."})
    control_port: int = field(default=0, metadata={"doc": "Port of the node control service (0: any)."})
    transports: tuple[str, ...] = field(
        default=("shm://", "tcp://"),
        metadata={"doc": "Transports served, by URI scheme (tcp:// binds node.host)."},
    )
    host_id: str = field(
        default="", metadata={"doc": "Same-host identity override (default: hostname/boot id)."}
    )
    hold_ttl: float = field(
        default=60.0,
        metadata={"unit": "duration", "doc": "Reclaim allocations/leases a client holds longer than this."},
    )
    metrics_port: int = field(
        default=0, metadata={"doc": "Prometheus /metrics HTTP port on node.host; 0 picks one, -1 disables."}
    )
    max_connections: int = field(
        default=1024, metadata={"doc": "Most open connections on the node's control channel, and on each of its transports "
                                  "(tcp://, shm://); at the cap the one idle longest makes room, none idle: refused."}
    )
    idle_timeout: float = field(
        default=300.0,
        metadata={"unit": "duration", "doc": "Close a control connection idle this long between requests."},
    )
    max_holds: int = field(
        default=65536, metadata={"doc": "Most handles (puts/reads in flight) one client session may hold."}
    )
    busy_backoff: float = field(
        default=0.01,
        metadata={"unit": "duration",
                  "doc": "A request that finds its session at node.max_holds is answered BUSY after this "
                         "delay, so one session flooding the node with holds cannot take its CPU from "
                         "others; 0 answers at once."},
    )
    insecure: bool = field(
        default=False,
        metadata={"doc": "Serve a non-loopback node.host without a token (protected mode refuses that "
                         "by default)."},
    )
    tls_cert: str | None = field(
        default=None, metadata={"doc": "PEM certificate the control channel serves TLS with; unset: plain TCP."}
    )
    tls_key: str | None = field(default=None, metadata={"doc": "PEM private key of node.tls_cert."})
    tls_ca: str | None = field(
        default=None, metadata={"doc": "CA (PEM) to verify the master's TLS certificate; unset: plain gRPC."}
    )
    tls_client_ca: str | None = field(
        default=None,
        metadata={"doc": "Mutual TLS: CA (PEM) whose certificates peers of the control channel and tcp:// "
                         "must present; unset: no client certificate asked. Needs node.tls_cert, which the "
                         "node also presents to a master that asks for one."},
    )

    def __post_init__(self) -> None:
        _coerce_units(self, "node")
        object.__setattr__(self, "transports", tuple(self.transports))
        if not self.transports:
            raise ConfigError("node.transports must name at least one transport")
        for uri in self.transports:
            if "://" not in uri:
                raise ConfigError(f"node.transports: {uri!r} is not a URI like 'tcp://'")
        if self.hold_ttl <= 0:
            raise ConfigError("node.hold_ttl must be > 0")
        for name in ("max_connections", "max_holds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"node.{name} must be an integer >= 1, got {v!r}")
        if self.idle_timeout <= 0:
            raise ConfigError("node.idle_timeout must be > 0")
        if self.busy_backoff < 0:
            raise ConfigError("node.busy_backoff must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("node.tls_cert and node.tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("node.tls_client_ca (mutual TLS) needs node.tls_cert and node.tls_key")


@dataclass(frozen=True)
class Config:
    """Top-level kvstore configuration; one section per component."""

    store: StoreConfig = field(default_factory=StoreConfig)
    master: MasterConfig = field(default_factory=MasterConfig)
    node: NodeConfig = field(default_factory=NodeConfig)


C = TypeVar("C")


def build(cls: type[C], data: dict[str, Any], section: str) -> C:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError."""
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(f'{section}.{k}' for k in unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = names[name]
        key = f"{section}.{name}" if section else name
        factory = f.default_factory
        section_cls = type(factory()) if factory is not dataclasses.MISSING else None
        if section_cls is not None and dataclasses.is_dataclass(section_cls):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must be a table of settings, got {value!r}")
            kwargs[name] = build(section_cls, value, key)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (InvalidArgument, TypeError, ValueError) as e:
        raise ConfigError(f"{section or 'config'}: {e}") from e


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load ``path`` (TOML) if given, apply dotted ``overrides`` (``{"store.dram": "2GiB"}``)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path} not found") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from e
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {p} is not a section")
        node[leaf] = value
    return build(Config, data, "")


def _coerce_units(obj: Any, section: str) -> None:
    """Parse human units in place on a frozen dataclass, naming the key on error."""
    for f in dataclasses.fields(obj):
        unit = f.metadata.get("unit")
        value = getattr(obj, f.name)
        try:
            if unit == "size":
                object.__setattr__(obj, f.name, parse_size(value, name=f"{section}.{f.name}"))
            elif unit == "duration":
                object.__setattr__(obj, f.name, parse_duration(value, name=f"{section}.{f.name}"))
        except InvalidArgument as e:
            raise ConfigError(str(e)) from e


def describe(cls: type[Any], section: str) -> list[tuple[str, str, str]]:
    """``(key, default, doc)`` for every field, for ``--help`` and docs."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "(section)"
        rows.append((f"{section}.{f.name}", str(default), f.metadata.get("doc", "")))
    return rows
