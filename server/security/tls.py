"""TLS for the SuperLink: a CA and a server certificate, private keys written 0600.

Flower 1.42 serves the SuperLink's Fleet, Control and Runtime APIs over one HTTPS port.
The SuperLink needs a CA certificate, a server certificate and its private key
(``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``); SuperNodes and the ``flwr`` CLI
trust the CA (``--root-certificates`` / ``root-certificates`` in ``config.toml``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.security.errors import DeployError

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")

_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TLSFiles:
    """Paths of a generated CA and server certificate (all PEM)."""

    ca_cert: Path  # give to SuperNodes (--root-certificates) and the flwr CLI
    ca_key: Path  # keep offline: it signs new server certificates
    server_cert: Path  # --ssl-certfile
    server_key: Path  # --ssl-keyfile


def _new_key(key_type: str) -> _PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise DeployError(f"key_type must be 'ec' or 'rsa', got {key_type!r}")


def _write_private_pem(path: Path, key: _PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(path, pem)


def write_secret(path: Path, data: bytes) -> None:
    # Private keys are created 0600 from the start, never world-readable even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def generate_tls(
    out_dir: Path | str,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    days: int = 365,
    key_type: str = "ec",
    common_name: str = "leanfed SuperLink",
) -> TLSFiles:
    """Write ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` into ``out_dir``.

    ``hosts`` are the names and IP addresses SuperNodes and the CLI use to reach the
    SuperLink; each becomes a subjectAltName (IPs as IP entries, names as DNS entries),
    since TLS clients verify the SAN, not the common name.
    """
    if not hosts:
        raise DeployError("hosts must name at least one address of the SuperLink")
    if days < 1:
        raise DeployError(f"days must be >= 1, got {days}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    # Backdate by a minute so clocks a little behind still accept the certificate.
    not_before, not_after = now - dt.timedelta(minutes=1), now + dt.timedelta(days=days)

    ca_key = _new_key(key_type)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = _new_key(key_type)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TLSFiles(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    for cert in (files.ca_cert, files.server_cert):
        os.chmod(cert, 0o644)  # public by design, whatever the umask
    _write_private_pem(files.ca_key, ca_key)
    _write_private_pem(files.server_key, server_key)
    return files

