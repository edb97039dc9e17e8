"""TLS for the master's gRPC port and framed channel and the nodes' control channels.

``kvstore auth init DIR --tls --tls-host HOST ...`` makes a small private CA and one
server certificate (``DIR/tls/ca.pem``, ``server.pem``, ``server.key``) whose names
cover every listed host (plus ``localhost`` and ``127.0.0.1``). Masters and nodes
serve with the certificate and key; clients and nodes verify peers against the CA
(``tls_ca``), names included. TLS 1.2 or newer; certificates from your own PKI work
the same way.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from kvstore.errors import ConfigError


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from e


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """For a listener serving ``cert`` (PEM, chain allowed) with ``key``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS certificate {cert} / key {key}: {e}") from e
    return ctx


def client_context(ca: str | Path) -> ssl.SSLContext:
    """For connecting to listeners whose certificates ``ca`` signed (names checked)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def grpc_server_credentials(cert: str | Path, key: str | Path) -> object:
    import grpc

    return grpc.ssl_server_credentials([(_read(key, "TLS key"), _read(cert, "TLS certificate"))])


def grpc_channel_credentials(ca: str | Path) -> object:
    import grpc

    return grpc.ssl_channel_credentials(root_certificates=_read(ca, "TLS CA"))


def make(directory: Path, hosts: list[str], days: int = 825) -> dict[str, Path]:
    """A CA and one server certificate for ``hosts`` under ``directory`` (keys 0600)."""
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
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kvstore")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = {"ca": directory / "ca.pem", "ca_key": directory / "ca.key",
             "cert": directory / "server.pem", "key": directory / "server.key"}
    pem = serialization.Encoding.PEM
    private = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    for path, data, secret in ((files["ca"], ca.public_bytes(pem), False),
                               (files["ca_key"], ca_key.private_bytes(pem, *private), True),
                               (files["cert"], cert.public_bytes(pem), False),
                               (files["key"], key.private_bytes(pem, *private), True)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return files
