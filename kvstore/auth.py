"""Credentials: bearer tokens, each mapped to a role (and a tenant) by the master.

Roles:

* ``admin``: every call;
* ``node``: a store node's calls to the master (``RegisterNode``, ``ReportHeld``,
  ``Heartbeat``, ``Hello``); nothing a client does;
* ``client``: the SDK's calls (puts, reads, removes, pins, stats), for one ``tenant``,
  confined to the keys of that tenant: keys that start with ``@TENANT/`` (the SDK
  prepends it to every key it is given, so tenants with identical prompts never
  share or see each other's chunks). The master and the nodes refuse other keys.

A deployment keeps them in one directory made by ``kvstore auth init DIR`` (and
``kvstore auth add-tenant DIR NAME``): ``DIR/credentials.json`` lists the SHA-256
digest of every token with its role and tenant (never the tokens), and each token
sits in its own 0600 file (``admin.token``, ``node.token``, ``tenants/NAME.token``)
to hand to whoever plays that role. The master reads ``credentials.json``
(``master.auth_dir``) and re-reads it when it changes; nodes learn the digests of the
client tokens from the master and check them on their own listeners.

The older single shared token (``master.token_file``) is the same thing with one
credential that plays every role.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kvstore.errors import ConfigError, InvalidArgument

ROLES = ("admin", "node", "client")
CREDENTIALS = "credentials.json"


def digest(token: str | bytes) -> str:
    """SHA-256 of a token (hex): what is stored and compared, never the token itself."""
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Principal:
    role: str
    tenant: str

    @property
    def scope(self) -> bytes:
        """The key prefix this principal is confined to: a client's tenant (``@NAME/``);
        empty (any key) for admins and nodes."""
        return scope_of(self.tenant) if self.role == "client" else b""


def scope_of(tenant: str) -> bytes:
    return f"@{tenant}/".encode()


class TenantLimits(NamedTuple):
    """A tenant's quotas in ``credentials.json`` (None: no limit); the master refuses a
    call that would go beyond one with RESOURCE_EXHAUSTED."""

    quota_bytes: int | None = None
    """Most bytes of complete objects its keys may hold (puts beyond: NoSpace)."""
    max_pins: int | None = None
    """Most of its keys pinned at once (pins beyond: NoSpace)."""
    max_puts_in_flight: int | None = None
    """Most of its keys reserved by puts not yet ended (puts beyond: TryAgain)."""


LIMIT_FIELDS = TenantLimits._fields


class Credentials:
    """digest -> :class:`Principal`; ``check(token)`` in constant time per entry."""

    def __init__(self, entries: dict[str, Principal], source: str = "",
                 limits: dict[str, TenantLimits] | None = None) -> None:
        self.entries = entries
        self.source = source
        self.limits = limits or {}
        """tenant -> its quotas (absent: no limit)."""

    @classmethod
    def shared(cls, token: str) -> Credentials:
        """One token for every role (``master.token_file``)."""
        return cls({digest(token): Principal("admin", "default")}, "master.token_file")

    @classmethod
    def load(cls, directory: Path) -> Credentials:
        path = Path(directory) / CREDENTIALS
        try:
            doc = json.loads(path.read_text())
            entries = {}
            limits: dict[str, TenantLimits] = {}
            for e in doc["credentials"]:
                role, tenant, d = str(e["role"]), str(e.get("tenant", "default")), str(e["sha256"])
                if role not in ROLES or len(d) != 64:
                    raise ValueError(f"bad entry {e!r:.80}")
                entries[d] = Principal(role, tenant)
                if role == "client":
                    lim = TenantLimits(*(None if e.get(f) is None else int(e[f]) for f in LIMIT_FIELDS))
                    if lim != TenantLimits():
                        limits[tenant] = lim
        except OSError as e:
            raise ConfigError(f"master.auth_dir {directory}: cannot read {CREDENTIALS}: {e.strerror} "
                              "(create it with `kvstore auth init DIR`)") from e
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"master.auth_dir {directory}: {CREDENTIALS} is malformed: {e}") from e
        return cls(entries, str(path), limits)

    def check(self, token: str | bytes | None) -> Principal | None:
        """The principal a presented token stands for, or None. Looked up by the token's
        SHA-256 (a lookup's timing says nothing useful about the token itself)."""
        return self.entries.get(digest(token)) if token else None

    def of_certificate(self, role: str, tenant: str) -> Principal | None:
        """The principal a verified client certificate naming ``role``/``tenant`` stands for:
        an admin, or a client of a tenant these credentials hold (a tenant taken out of
        ``credentials.json`` loses its certificates' access too); else None."""
        if role == "admin":
            return Principal("admin", "default")
        if role == "client" and tenant in self.tenants:
            return Principal("client", tenant)
        return None

    @functools.cached_property
    def tenants(self) -> frozenset[str]:
        """Tenants with at least one client credential."""
        return frozenset(p.tenant for p in self.entries.values() if p.role == "client")

    def client_digests(self) -> list[str]:
        """Digests of every token a node must accept on its listeners (clients and admins)."""
        return sorted(d for d, p in self.entries.items() if p.role in ("client", "admin"))

    def client_scopes(self) -> list[bytes]:
        """The key scope of each :meth:`client_digests` entry, in the same order."""
        return [self.entries[d].scope for d in self.client_digests()]

    @functools.cached_property
    def version(self) -> str:
        """Changes whenever the set of accepted client tokens (or their scopes) changes."""
        return digest(",".join(f"{d}:{self.entries[d].scope.hex()}" for d in self.client_digests()))[:16]


def check_tenant(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidArgument(f"tenant name {name!r} must be 1-64 letters, digits, '-', '_' or '.'")
    return name


def _write_token(path: Path) -> str:
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def _save(directory: Path, doc: dict[str, object]) -> None:
    tmp = directory / (CREDENTIALS + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, directory / CREDENTIALS)


def init(directory: Path, tenant: str = "default") -> dict[str, Path]:
    """Create ``directory`` with an admin token, a node token and a client token for
    ``tenant``; refuses to overwrite an existing one. Returns the token files."""
    directory = Path(directory)
    if (directory / CREDENTIALS).exists():
        raise InvalidArgument(f"{directory} already holds {CREDENTIALS}; add tenants with "
                              "`kvstore auth add-tenant` or pick another directory")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    check_tenant(tenant)
    files = {"admin": directory / "admin.token", "node": directory / "node.token",
             f"client:{tenant}": directory / "tenants" / f"{tenant}.token"}
    entries = []
    for what, path in files.items():
        role, _, t = what.partition(":")
        entries.append({"sha256": digest(_write_token(path)), "role": role, "tenant": t or "default",
                        "file": str(path.relative_to(directory))})
    _save(directory, {"version": 1, "credentials": entries})
    return files


def add_tenant(directory: Path, tenant: str, quota_bytes: int | None = None, *, max_pins: int | None = None,
               max_puts_in_flight: int | None = None) -> Path:
    """A new client token for ``tenant`` in an existing directory; its token file.
    The tenant's limits (None: none): ``quota_bytes``, the most bytes its keys may hold
    in the pool; ``max_pins``, the most of its keys pinned at once; ``max_puts_in_flight``,
    the most of its keys reserved by puts not yet ended."""
    directory = Path(directory)
    check_tenant(tenant)
    try:
        doc = json.loads((directory / CREDENTIALS).read_text())
    except OSError as e:
        raise InvalidArgument(f"{directory}: no {CREDENTIALS} ({e.strerror}); run `kvstore auth init` first") from e
    path = directory / "tenants" / f"{tenant}.token"
    if path.exists():
        raise InvalidArgument(f"tenant {tenant!r} already has a token ({path})")
    entry: dict[str, object] = {"sha256": digest(_write_token(path)), "role": "client", "tenant": tenant,
                                "file": str(path.relative_to(directory))}
    for name, v in zip(LIMIT_FIELDS, (quota_bytes, max_pins, max_puts_in_flight), strict=True):
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidArgument(f"{name} for tenant {tenant!r} must be a whole number > 0, got {v!r}")
            entry[name] = v
    doc["credentials"].append(entry)
    _save(directory, doc)
    return path


# -- write grants ------------------------------------------------------------------------

GRANT_KEY_BYTES = 32
GRANT_SLACK_MS = 60_000
"""How far past its expiry a node still takes a grant: room for clock skew between the
master's host and the node's (the reservation itself lapses on the master's clock)."""
_GRANT = b"kvstore-put-grant\x00"
_MAC_BYTES = 16


def new_grant_key() -> bytes:
    """A master's secret for signing write grants (a new one per master process)."""
    return secrets.token_bytes(GRANT_KEY_BYTES)


def _grant_mac(secret: bytes, node_id: str, key: bytes, size: int, checksum: int, expires_ms: int) -> bytes:
    msg = b"".join((_GRANT, node_id.encode(), b"\x00", len(key).to_bytes(2, "big"), key,
                    size.to_bytes(8, "big"), checksum.to_bytes(8, "big"), expires_ms.to_bytes(8, "big")))
    return hmac.digest(secret, msg, "sha256")[:_MAC_BYTES]


def write_grant(secret: bytes, node_id: str, key: bytes, size: int, checksum: int, expires_ms: int) -> bytes:
    """The capability to store ``key`` (``size`` bytes hashing to ``checksum``) on node
    ``node_id`` until ``expires_ms`` (Unix ms): the expiry and an HMAC-SHA256 over all of
    it under the master's secret, which it shares with the nodes it registered."""
    return expires_ms.to_bytes(8, "big") + _grant_mac(secret, node_id, key, size, checksum, expires_ms)


def grant_ok(secret: bytes, node_id: str, key: bytes, size: int, checksum: int, grant: object,
             now_ms: int) -> bool:
    """Whether ``grant`` is a live :func:`write_grant` for exactly this write on this node."""
    if not isinstance(grant, bytes) or len(grant) != 8 + _MAC_BYTES:
        return False
    expires_ms = int.from_bytes(grant[:8], "big")
    if now_ms > expires_ms + GRANT_SLACK_MS:
        return False
    return hmac.compare_digest(grant[8:], _grant_mac(secret, node_id, key, size, checksum, expires_ms))
