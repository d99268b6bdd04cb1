"""Shamir secret sharing (Shamir 1979) of 32-byte secrets over the prime field GF(2^521 - 1).

A share is (x, y) with y = f(x), f a random polynomial of degree t-1 with f(0) = secret;
any t shares give f(0) by Lagrange interpolation, fewer give nothing. We do not reuse
pycryptodome's GF(2^128) sharing (Flower's choice): it is pure Python per 16-byte chunk
and took 0.16 s to combine 50 shares of ONE chunk here, i.e. tens of seconds per
100-client round; Python integers in one 521-bit Mersenne-prime field are ~100x faster.

Wire form of a share: x as 2 bytes little-endian || y as 66 bytes little-endian.
"""

from __future__ import annotations

import secrets

from strategies.secure.crypto import SecAggError

PRIME = 2**521 - 1  # Mersenne prime M521: holds any 256-bit secret as one field element
SECRET_BYTES = 32
Y_BYTES = 66  # ceil(521 / 8)
SHARE_BYTES = 2 + Y_BYTES
MAX_SHARES = 2**16 - 1


def split(secret: bytes, threshold: int, num_shares: int) -> list[bytes]:
    """`num_shares` shares at x = 1..num_shares; any `threshold` of them rebuild `secret`."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= num_shares <= MAX_SHARES:
        raise SecAggError(f"need 1 <= threshold ({threshold}) <= shares ({num_shares}) <= 65535")
    coeffs = [int.from_bytes(secret, "little")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out: list[bytes] = []
    for x in range(1, num_shares + 1):
        y = 0
        for c in reversed(coeffs):  # Horner: f(x) mod p
            y = (y * x + c) % PRIME
        out.append(x.to_bytes(2, "little") + y.to_bytes(Y_BYTES, "little"))
    return out


def parse_share(share: bytes) -> tuple[int, int]:
    """(x, y) of a wire share, checked: x in [1, 65535], y < p."""
    if len(share) != SHARE_BYTES:
        raise SecAggError(f"a share has {SHARE_BYTES} bytes, got {len(share)}")
    x = int.from_bytes(share[:2], "little")
    y = int.from_bytes(share[2:], "little")
    if x == 0 or y >= PRIME:
        raise SecAggError("malformed share (x = 0 or y outside the field)")
    return x, y


def combine(shares: list[bytes], threshold: int) -> bytes:
    """Rebuild the secret from at least `threshold` shares with distinct x (uses the first t).

    f(0) = sum_i y_i * prod_{j != i} x_j / (x_j - x_i)  (mod p).
    """
    points: dict[int, int] = {}
    for s in shares:
        x, y = parse_share(s)
        points.setdefault(x, y)
    if len(points) < threshold:
        raise SecAggError(f"{len(points)} distinct shares, {threshold} needed")
    xs = sorted(points)[:threshold]
    secret = 0
    for xi in xs:
        num, den = 1, 1
        for xj in xs:
            if xj != xi:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + points[xi] * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError("shares are inconsistent (rebuilt value is not a 32-byte secret)")
    return secret.to_bytes(SECRET_BYTES, "little")
