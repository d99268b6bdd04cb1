"""Key agreement (X25519 + HKDF), authenticated encryption and the mask PRG, via `cryptography`.

Flower's own helpers (``flwr.common.secure_aggregation``) are not reused here: their PRG
seeds numpy's RandomState with 32 bits of the agreed key (2^32 possible masks), and their
Fernet encryption base64-inflates every share; SecAgg+ needs a cryptographic PRG
(Bell et al. 2020 use AES-CTR; we use the ChaCha20 keystream) and compact ciphertexts.
"""

from __future__ import annotations

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

KEY_BYTES = 32  # X25519 keys, agreed keys, PRG seeds
NONCE_BYTES = 12
TAG_BYTES = 16


class SecAggError(ValueError):
    """A secure-aggregation step failed: bad key, failed decryption, too few shares, ..."""


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes: (secret key 32 B, public key 32 B)."""
    sk = X25519PrivateKey.generate()
    sk_raw = sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return sk_raw, sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_key_of(sk: bytes) -> bytes:
    """The X25519 public key of a raw secret key (checks a reconstructed key against its pk)."""
    if len(sk) != KEY_BYTES:
        raise SecAggError(f"an X25519 secret key has {KEY_BYTES} bytes, got {len(sk)}")
    key = X25519PrivateKey.from_private_bytes(sk)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(sk: bytes, pk: bytes, info: bytes) -> bytes:
    """32-byte key = HKDF-SHA256(X25519(sk, pk), info); symmetric in the two parties.

    `info` binds the key to its purpose and round, so the encryption key and the mask seed
    agreed from different key pairs never coincide.
    """
    if len(sk) != KEY_BYTES or len(pk) != KEY_BYTES:
        raise SecAggError("X25519 keys must be 32 bytes")
    try:
        shared = X25519PrivateKey.from_private_bytes(sk).exchange(
            X25519PublicKey.from_public_bytes(pk)
        )
    except ValueError as exc:  # low-order public key: the shared secret would be all zeros
        raise SecAggError(f"key agreement failed: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def encrypt(key: bytes, plaintext: bytes, aad: bytes, nonce: bytes) -> bytes:
    """ChaCha20-Poly1305: nonce (12 B) || ciphertext || tag (16 B); `aad` is authenticated."""
    if len(nonce) != NONCE_BYTES:
        raise SecAggError(f"nonce must be {NONCE_BYTES} bytes")
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Inverse of `encrypt`; raises SecAggError when the blob was altered or misaddressed."""
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(f"ciphertext too short ({len(blob)} bytes)")
    try:
        return ChaCha20Poly1305(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SecAggError("ciphertext failed authentication") from None


def prg(seed: bytes, n: int) -> np.ndarray:
    """n uniform uint64 words: the ChaCha20 keystream of `seed` (the PRG of SecAgg, expanded).

    Shape [n], dtype uint64. A word reduced mod 2^L (L <= 64) stays uniform, so one stream
    masks segments of different ring sizes.
    """
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"PRG seed must be {KEY_BYTES} bytes, got {len(seed)}")
    if n < 0:
        raise SecAggError(f"PRG length must be >= 0, got {n}")
    enc = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    stream = enc.update(b"\x00" * (8 * n))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)
