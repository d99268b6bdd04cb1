"""Ed25519 signing keys of the server and domain-separated signatures over canonical JSON.

The private key lives in a file outside the run store and the run config (its path comes
from ``--signing-key`` or ``LEANFED_SIGNING_KEY``); the store keeps only signatures and
the key id. Keys are OpenSSH Ed25519, the format Flower's ``--trusted-entities`` and
``flwr app review`` use, so one key signs checkpoints, exported models and FABs.

A signature covers ``domain || "\\n" || canonical JSON(payload)``: the domain keeps a
checkpoint signature from being replayed as an export or app signature.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from server.security.errors import DeployError, SignatureError
from server.security.tls import write_secret

ENV_VAR = "LEANFED_SIGNING_KEY"
MAX_KEY_FILE_BYTES = 16_384  # an OpenSSH Ed25519 key is ~400 bytes; refuse anything huge
SIGNATURE_BYTES = 64


def canonical_json(value: Any) -> bytes:
    """Sorted-key, no-whitespace JSON: the bytes that hashes and signatures cover."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def digest(value: Any) -> str:
    """SHA-256 hex of ``canonical_json(value)``."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """``ed25519:`` + the first 32 hex chars of SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def openssh_public(public_key: ed25519.Ed25519PublicKey) -> str:
    """``ssh-ed25519 AAAA...``: the line Flower's trusted-entities YAML holds."""
    return public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")


def _message(domain: str, payload: Mapping[str, Any]) -> bytes:
    return domain.encode("ascii") + b"\n" + canonical_json(dict(payload))


@dataclass(frozen=True)
class Verifier:
    """An Ed25519 public key that checks signatures made by its private key."""

    public_key: ed25519.Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def verify(self, domain: str, payload: Mapping[str, Any], signature: bytes, what: str) -> None:
        """Raise SignatureError (one line naming ``what``) unless ``signature`` is valid."""
        if len(signature) != SIGNATURE_BYTES:
            raise SignatureError(f"{what}: signature is {len(signature)} bytes, not 64")
        try:
            self.public_key.verify(signature, _message(domain, payload))
        except InvalidSignature:
            raise SignatureError(
                f"{what}: signature does not match (changed after signing, or signed by "
                f"another key than {self.key_id})"
            ) from None


@dataclass(frozen=True)
class Signer:
    """The server's Ed25519 private key."""

    private_key: ed25519.Ed25519PrivateKey

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.private_key.public_key())

    @property
    def key_id(self) -> str:
        return self.verifier.key_id

    def sign(self, domain: str, payload: Mapping[str, Any]) -> bytes:
        return self.private_key.sign(_message(domain, payload))


@dataclass(frozen=True)
class SigningKeyFiles:
    """A generated signing key pair."""

    private_key: Path  # keep on the server host, outside the store: LEANFED_SIGNING_KEY
    public_key: Path  # give to sites (--trusted-entities) and to verifiers
    key_id: str


def generate_signing_key(out_dir: Path | str, name: str = "leanfed-signing") -> SigningKeyFiles:
    """Write ``NAME`` (OpenSSH private key, 0600) and ``NAME.pub`` into ``out_dir``."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise DeployError(f"key name must be letters, digits, '-', '_' or '.', got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv, pub = out / name, out / f"{name}.pub"
    if priv.exists() or pub.exists():
        raise DeployError(f"{priv} or {pub} already exists; refusing to overwrite a key")
    key = ed25519.Ed25519PrivateKey.generate()
    write_secret(
        priv,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    pub.write_text(f"{openssh_public(key.public_key())} {name}\n", encoding="ascii")
    os.chmod(pub, 0o644)
    return SigningKeyFiles(private_key=priv, public_key=pub, key_id=key_id(key.public_key()))


def _read_key_file(path: Path) -> bytes:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise SignatureError(f"signing key {path} is not a regular file")
        if info.st_size > MAX_KEY_FILE_BYTES:
            raise SignatureError(f"signing key {path} is {info.st_size} bytes; not a key file")
        return path.read_bytes()
    except FileNotFoundError:
        raise SignatureError(f"signing key {path} does not exist") from None
    except PermissionError:
        raise SignatureError(f"signing key {path} is not readable") from None


def _is_private(data: bytes) -> bool:
    return b"PRIVATE KEY" in data


def _load_private(path: Path, data: bytes) -> ed25519.Ed25519PrivateKey:
    # Like ssh: a private key others can read is treated as already leaked.
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise SignatureError(
            f"signing key {path} is readable by other users; run `chmod 600 {path}`"
        )
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key: object = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SignatureError(f"signing key {path} is not an unencrypted Ed25519 key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"signing key {path} is not an Ed25519 key")
    return key


def is_private_key_file(path: Path | str) -> bool:
    """Whether ``path`` holds a private key (it may instead hold only the public key)."""
    return _is_private(_read_key_file(Path(path).expanduser()))


def load_signer(path: Path | str) -> Signer:
    """The private key at ``path`` (OpenSSH or PKCS8 PEM, Ed25519, mode 0600)."""
    p = Path(path).expanduser()
    data = _read_key_file(p)
    if not _is_private(data):
        raise SignatureError(f"signing key {p} is a public key; signing needs the private key")
    return Signer(_load_private(p, data))


def load_verifier(path: Path | str) -> Verifier:
    """A verifier from a private key file or its ``.pub`` (OpenSSH line or PEM)."""
    p = Path(path).expanduser()
    data = _read_key_file(p)
    if _is_private(data):
        return Signer(_load_private(p, data)).verifier
    try:
        if data.lstrip().startswith(b"ssh-"):
            pub: object = serialization.load_ssh_public_key(data.strip())
        else:
            pub = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SignatureError(f"verify key {p} is not an Ed25519 public key") from None
    if not isinstance(pub, ed25519.Ed25519PublicKey):
        raise SignatureError(f"verify key {p} is not an Ed25519 key")
    return Verifier(pub)


def key_path(option: str | Path | None) -> Path | None:
    """The key file named by ``--signing-key``, else ``$LEANFED_SIGNING_KEY``, else None."""
    if option is not None and str(option):
        return Path(option)
    env = os.environ.get(ENV_VAR, "")
    return Path(env) if env else None


def signer_from(option: str | Path | None) -> Signer | None:
    """The configured signer, or None when no key is configured."""
    path = key_path(option)
    return None if path is None else load_signer(path)


def verifier_from(option: str | Path | None) -> Verifier | None:
    """The configured verifier (private or public key file), or None."""
    path = key_path(option)
    return None if path is None else load_verifier(path)
