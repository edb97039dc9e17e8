"""TLS for the master's gRPC port and framed channel and the nodes' control channels.

``kvstore auth init DIR --tls --tls-host HOST ...`` makes a small private CA, one
server certificate (``DIR/tls/ca.pem``, ``server.pem``, ``server.key``) whose names
cover every listed host (plus ``localhost`` and ``127.0.0.1``), and one client
certificate (``client.pem``, ``client.key``). Masters and nodes serve with the server
certificate and key; clients and nodes verify peers against the CA (``tls_ca``), names
included. TLS 1.2 or newer; certificates from your own PKI work the same way.

Mutual TLS: a master or node given ``tls_client_ca`` asks every peer for a certificate
that CA signed and refuses the handshake without one. Clients then present
``tls_cert``/``tls_key`` (the client certificate); nodes present their own serving
certificate to the master (so it must allow client authentication too: the one
``make`` writes does).

Certificate identities: a client certificate may also name a role and tenant, as a URI
subject alternative name ``kvstore:client:TENANT`` or ``kvstore:admin`` (:func:`issue`;
``kvstore auth init --tls`` and ``kvstore auth add-tenant --tls`` write one per tenant).
Under mutual TLS a master that authenticates (``--auth-dir``) and the nodes take a peer
presenting such a certificate (signed by the CA they trust) as that principal when it
sends no token; a certificate without one only admits the connection, and the token
decides (kvstore.auth). There is no revocation list: a CA-signed identity holds until
the certificate expires (re-key the CA to drop one early).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from kvstore.errors import ConfigError


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from e


def _load_chain(ctx: ssl.SSLContext, cert: str | Path, key: str | Path) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS certificate {cert} / key {key}: {e}") from e


def server_context(cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> ssl.SSLContext:
    """For a listener serving ``cert`` (PEM, chain allowed) with ``key``; with
    ``client_ca``, every peer must present a certificate that CA signed (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key)
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(client_ca))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"TLS client CA {client_ca}: {e}") from e
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str | Path, cert: str | Path | None = None, key: str | Path | None = None) -> ssl.SSLContext:
    """For connecting to listeners whose certificates ``ca`` signed (names checked),
    presenting ``cert``/``key`` when given (to listeners that require client certificates)."""
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS CA {ca}: {e}") from e
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key)
    return ctx


def grpc_server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> object:
    """gRPC's twin of :func:`server_context`."""
    import grpc

    pair = [(_read(key, "TLS key"), _read(cert, "TLS certificate"))]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=_read(client_ca, "TLS client CA"),
                                       require_client_auth=True)


def grpc_channel_credentials(ca: str | Path, cert: str | Path | None = None, key: str | Path | None = None) -> object:
    """gRPC's twin of :func:`client_context`."""
    import grpc

    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=_read(ca, "TLS CA"))
    return grpc.ssl_channel_credentials(root_certificates=_read(ca, "TLS CA"),
                                        private_key=_read(key, "TLS key"), certificate_chain=_read(cert, "TLS certificate"))


@dataclass(frozen=True)
class ClientTLS:
    """What a client (an SDK client, or a node calling its master) verifies peers with,
    and the certificate it presents where mutual TLS is required."""

    ca: str
    cert: str | None = None
    key: str | None = None

    @classmethod
    def of(cls, ca: str | Path | None, cert: str | Path | None = None,
           key: str | Path | None = None) -> ClientTLS | None:
        """None without a CA; ConfigError for a certificate without its key (or the reverse),
        or one without a CA to verify the other side."""
        if (cert is None) != (key is None):
            raise ConfigError("a TLS client certificate and its key go together (tls_cert, tls_key)")
        if ca is None:
            if cert is not None:
                raise ConfigError("a TLS client certificate needs tls_ca to verify the server with")
            return None
        return cls(str(ca), None if cert is None else str(cert), None if key is None else str(key))

    def context(self) -> ssl.SSLContext:
        return client_context(self.ca, self.cert, self.key)

    def grpc_credentials(self) -> object:
        return grpc_channel_credentials(self.ca, self.cert, self.key)


def make(directory: Path, hosts: list[str], days: int = 825) -> dict[str, Path]:
    """A CA, one server certificate for ``hosts`` and one client certificate under
    ``directory`` (keys 0600). The server certificate also allows client authentication:
    nodes present it to a master that requires client certificates."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvstore CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))

    def leaf(common_name: str, usages: list[x509.ObjectIdentifier], alt: list[x509.GeneralName] | None
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
             .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if alt:
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    cert, key = leaf("kvstore", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], names)
    client_cert, client_key = leaf("kvstore client", [ExtendedKeyUsageOID.CLIENT_AUTH], None)
    files = {"ca": directory / "ca.pem", "ca_key": directory / "ca.key",
             "cert": directory / "server.pem", "key": directory / "server.key",
             "client_cert": directory / "client.pem", "client_key": directory / "client.key"}
    pem = serialization.Encoding.PEM
    private = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    for path, data, secret in ((files["ca"], ca.public_bytes(pem), False),
                               (files["ca_key"], ca_key.private_bytes(pem, *private), True),
                               (files["cert"], cert.public_bytes(pem), False),
                               (files["key"], key.private_bytes(pem, *private), True),
                               (files["client_cert"], client_cert.public_bytes(pem), False),
                               (files["client_key"], client_key.private_bytes(pem, *private), True)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return files


# -- certificate identities -----------------------------------------------------------------

IDENTITY_SCHEME = "kvstore:"


class CertIdentity(NamedTuple):
    """The role (``client``, ``admin``) and tenant a client certificate names."""

    role: str
    tenant: str


def identity_uri(role: str, tenant: str = "") -> str:
    """The URI SAN naming ``role`` (and a client's ``tenant``) in a certificate."""
    if role not in ("client", "admin"):
        raise ConfigError(f"certificate identities name a client or an admin, not {role!r}")
    return f"{IDENTITY_SCHEME}client:{tenant}" if role == "client" else f"{IDENTITY_SCHEME}admin"


@functools.lru_cache(maxsize=256)
def identity_of(der: bytes) -> CertIdentity | None:
    """The identity a (DER) certificate names in its URI SANs, or None. Call it only for
    a certificate the TLS handshake verified against the trusted CA."""
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)
    except (ValueError, x509.ExtensionNotFound):
        return None
    found = {u for u in uris if u.startswith(IDENTITY_SCHEME)}
    if len(found) != 1:  # none, or an ambiguous certificate: no identity
        return None
    role, _, tenant = found.pop()[len(IDENTITY_SCHEME):].partition(":")
    if role == "admin" and not tenant:
        return CertIdentity("admin", "default")
    if role == "client" and tenant:
        return CertIdentity("client", tenant)
    return None


def identity_of_pem(pem: bytes) -> CertIdentity | None:
    """:func:`identity_of` for a PEM certificate (what gRPC's auth context carries)."""
    return identity_of(ssl.PEM_cert_to_DER_cert(pem.decode("ascii", "replace")))


def issue(tls_dir: Path, out: Path, role: str, tenant: str = "", days: int = 825) -> tuple[Path, Path]:
    """A client certificate naming ``role``/``tenant`` (:func:`identity_uri`), signed by the
    CA in ``tls_dir`` (``ca.pem``, ``ca.key`` from :func:`make`): ``out.pem`` and
    ``out.key`` (0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    try:
        ca = x509.load_pem_x509_certificate((tls_dir / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((tls_dir / "ca.key").read_bytes(), None)
    except OSError as e:
        raise ConfigError(f"{tls_dir}: no CA to sign with ({e.strerror}); run `kvstore auth init --tls`") from e
    from cryptography.hazmat.primitives.asymmetric import ec

    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{tls_dir}/ca.key: expected the EC key `kvstore auth init --tls` writes")
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    uri = identity_uri(role, tenant)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, uri)]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem_path, key_path = out.with_suffix(".pem"), out.with_suffix(".key")
    out.parent.mkdir(parents=True, exist_ok=True)
    pem_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return pem_path, key_path
