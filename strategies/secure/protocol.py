"""SecAgg+ (Bell et al., CCS 2020) client and server steps as pure functions; no I/O, no flwr.

One round, n sampled nodes, each with a share group G_i = {i} ∪ N(i) (N: a k-regular
circulant graph on a seeded shuffle of the nodes, or the complete graph) and threshold
t_i > |G_i| / 2:

0. advertise   each node makes two X25519 key pairs: c (encrypts shares) and s (masks).
1. share keys  node i draws a self-mask seed b_i, Shamir-shares b_i and s_sk_i among G_i
               (t_i of |G_i|), keeps its own share and encrypts one share pair for each
               neighbour j under HKDF(X25519(c_sk_i, c_pk_j)). U1 = nodes that finished.
2. masked input  node i sends y_i = x_i + PRG(b_i) + sum_{j in N(i) ∩ U1} ±PRG(s_ij)
               (+ if i < j, - otherwise; s_ij = HKDF(X25519(s_sk_i, s_pk_j))) in Z_{2^L}.
               U2 = nodes whose masked input arrived.
3. unmask      each survivor sends, for every member of its group it holds shares of, the
               b-share if that node is in U2 or the s_sk-share if it dropped (never both:
               a node asked once answers once). The server rebuilds b_i (i in U2) and
               s_sk_j (j in U1 \\ U2), removes PRG(b_i) and the pairwise masks survivors
               shared with dropped nodes; masks between two survivors cancel in the sum.

The model is semi-honest (honest-but-curious server, no signatures): Bell et al.'s
malicious-server variant adds a PKI and consistency checks that this port does not.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from strategies.secure import shamir
from strategies.secure.crypto import (
    KEY_BYTES,
    NONCE_BYTES,
    SecAggError,
    agree,
    decrypt,
    encrypt,
    generate_keypair,
    prg,
    public_key_of,
)

ID_BYTES = 8
B_SHARE, SK_SHARE = 0, 1  # kinds of share revealed at unmasking


def ids_to_bytes(ids: Iterable[int]) -> bytes:
    """Node ids (unsigned 64-bit: SuperNode ids exceed int64) as 8-byte little-endian words."""
    return b"".join(int(i).to_bytes(ID_BYTES, "little") for i in ids)


def ids_from_bytes(data: bytes, max_count: int) -> list[int]:
    """Inverse of `ids_to_bytes`, refusing a ragged or oversized list."""
    if len(data) % ID_BYTES or len(data) // ID_BYTES > max_count:
        raise SecAggError(f"node-id list of {len(data)} bytes (max {max_count} ids)")
    return [int.from_bytes(data[i : i + ID_BYTES], "little") for i in range(0, len(data), ID_BYTES)]


def neighbour_graph(nodes: Sequence[int], k: int, seed: int) -> dict[int, tuple[int, ...]]:
    """Neighbours of every node: complete when k == 0 or k >= n - 1, else k-regular circulant.

    SecAgg+ replaces SecAgg's complete graph by a sparse random graph of degree
    O(log n) (Bell et al. use a random Harary graph): on a seeded shuffle of the nodes,
    each links to the ceil(k/2) nodes on either side (degree k, or k+1 for odd k).
    """
    nodes = sorted(set(nodes))
    n = len(nodes)
    if k < 0:
        raise SecAggError(f"neighbour count must be >= 0, got {k}")
    if k == 0 or k >= n - 1:
        return {i: tuple(j for j in nodes if j != i) for i in nodes}
    order = list(nodes)
    random.Random(seed).shuffle(order)
    half = (k + 1) // 2
    pos = {node: p for p, node in enumerate(order)}
    out: dict[int, tuple[int, ...]] = {}
    for node in nodes:
        p = pos[node]
        near = {order[(p + d) % n] for d in range(-half, half + 1) if d != 0}
        out[node] = tuple(sorted(near))
    return out


def threshold_for(group_size: int, fraction: float) -> int:
    """t = floor(fraction * g) + 1, capped at g: with fraction >= 0.5, t > g / 2."""
    if not 0.5 <= fraction < 1.0:
        raise SecAggError(f"threshold fraction must be in [0.5, 1), got {fraction}")
    return min(group_size, int(fraction * group_size) + 1)


def _info(purpose: bytes, server_round: int) -> bytes:
    return b"leanfed-secagg-" + purpose + b"|" + server_round.to_bytes(8, "little")


def _share_header(src: int, dst: int, server_round: int) -> bytes:
    return ids_to_bytes([src, dst]) + server_round.to_bytes(8, "little")


@dataclass
class ClientState:
    """What one node keeps between the stages of one round (in its private context.state)."""

    round: int
    node: int
    c_sk: bytes
    s_sk: bytes
    b: bytes = b""
    group: tuple[int, ...] = ()  # sorted share group, including `node`
    s_pks: dict[int, bytes] = field(default_factory=dict)
    threshold: int = 0
    # src -> (share of b_src, share of s_sk_src) held by this node, its own included
    held: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    answered: bool = False  # unmasking answers once per round


def advertise(server_round: int, node: int) -> tuple[ClientState, bytes, bytes]:
    """Stage 0: fresh key pairs; returns (state, c_pk, s_pk)."""
    c_sk, c_pk = generate_keypair()
    s_sk, s_pk = generate_keypair()
    return ClientState(round=server_round, node=node, c_sk=c_sk, s_sk=s_sk), c_pk, s_pk


def share_keys(
    state: ClientState, keys: Mapping[int, tuple[bytes, bytes]], threshold: int
) -> dict[int, bytes]:
    """Stage 1: share b and s_sk among the group `keys` (node -> (c_pk, s_pk), self included).

    Returns one ciphertext per neighbour. Refuses a group that does not contain this node
    with its own keys, or a threshold that would let a colluding minority rebuild secrets.
    """
    group = tuple(sorted(keys))
    g = len(group)
    own = keys.get(state.node)
    if own is None or own[1] != public_key_of(state.s_sk) or own[0] != public_key_of(state.c_sk):
        raise SecAggError("the share group does not hold this node's own public keys")
    if not (2 * threshold > g and threshold <= g):
        raise SecAggError(f"threshold {threshold} must exceed half of the group ({g})")
    for c_pk, s_pk in keys.values():
        if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
            raise SecAggError("a public key is not 32 bytes")
    state.b = os.urandom(KEY_BYTES)
    b_shares = shamir.split(state.b, threshold, g)
    sk_shares = shamir.split(state.s_sk, threshold, g)
    state.group, state.threshold = group, threshold
    state.s_pks = {j: keys[j][1] for j in group}
    out: dict[int, bytes] = {}
    for pos, j in enumerate(group):
        if j == state.node:
            state.held[j] = (b_shares[pos], sk_shares[pos])
            continue
        key = agree(state.c_sk, keys[j][0], _info(b"enc", state.round))
        header = _share_header(state.node, j, state.round)
        out[j] = encrypt(
            key, header + b_shares[pos] + sk_shares[pos], header, os.urandom(NONCE_BYTES)
        )
    return out


def receive_shares(
    state: ClientState, ciphertexts: Mapping[int, bytes], c_pks: Mapping[int, bytes]
) -> None:
    """Decrypt the shares group members sent this node (addressed, authenticated, this round)."""
    for src, blob in ciphertexts.items():
        if src not in state.s_pks or src == state.node:
            raise SecAggError(f"shares from node {src}, which is not in this node's group")
        key = agree(state.c_sk, c_pks[src], _info(b"enc", state.round))
        header = _share_header(src, state.node, state.round)
        plain = decrypt(key, blob, header)
        body = plain[len(header) :]
        if plain[: len(header)] != header or len(body) != 2 * shamir.SHARE_BYTES:
            raise SecAggError(f"share message from node {src} is malformed")
        state.held[src] = (body[: shamir.SHARE_BYTES], body[shamir.SHARE_BYTES :])


def _sign(i: int, j: int) -> int:
    return 1 if i < j else -1


def pairwise(s_sk: bytes, s_pk: bytes, server_round: int, n: int) -> np.ndarray:
    """PRG(s_ij): the mask two nodes agree on without talking (uint64 [n])."""
    return prg(agree(s_sk, s_pk, _info(b"mask", server_round)), n)


def mask_input(state: ClientState, x: np.ndarray, u1: Iterable[int]) -> np.ndarray:
    """Stage 2: y = x + PRG(b) + sum_{j in N(i) ∩ U1} ±PRG(s_ij), uint64 mod 2^64."""
    if not state.b:
        raise SecAggError("masked input requested before keys were shared")
    alive = {j for j in u1 if j in state.s_pks}
    if state.node not in alive or len(alive) < state.threshold:
        raise SecAggError(
            f"{len(alive)} group members finished key sharing, {state.threshold} needed"
        )
    n = int(x.shape[0])
    y = np.asarray(x, dtype=np.uint64) + prg(state.b, n)
    for j in sorted(alive - {state.node}):
        p = pairwise(state.s_sk, state.s_pks[j], state.round, n)
        y = y + p if _sign(state.node, j) > 0 else y - p
    return y


def unmask_shares(
    state: ClientState, survivors: Iterable[int], dropped: Iterable[int]
) -> list[tuple[int, int, bytes]]:
    """Stage 3: (src, kind, share) for every held src: b-share if it survived, sk-share if not.

    Refuses a second request, overlapping lists, or fewer than t surviving group members
    (the server could otherwise rebuild both secrets of one node and unmask it alone).
    """
    alive, gone = set(survivors), set(dropped)
    if state.answered:
        raise SecAggError("unmasking was already answered this round")
    if alive & gone:
        raise SecAggError("a node is listed both as surviving and as dropped")
    if state.node not in alive or len(alive & set(state.group)) < state.threshold:
        raise SecAggError("too few surviving group members to unmask")
    state.answered = True
    out: list[tuple[int, int, bytes]] = []
    for src, (b_share, sk_share) in sorted(state.held.items()):
        if src in alive:
            out.append((src, B_SHARE, b_share))
        elif src in gone:
            out.append((src, SK_SHARE, sk_share))
    return out


def unmask_sum(  # noqa: PLR0913 - the round's public transcript
    server_round: int,
    masked: Mapping[int, np.ndarray],
    groups: Mapping[int, tuple[int, ...]],
    thresholds: Mapping[int, int],
    s_pks: Mapping[int, bytes],
    u1: Iterable[int],
    shares: Mapping[int, Mapping[int, list[bytes]]],
) -> np.ndarray:
    """Server side of stage 3: sum_{i in U2} x_i (uint64, mod 2^64) from masked inputs.

    `masked`: U2 -> y_i; `groups`: node -> share group (self included); `shares`:
    kind -> src -> shares received. Rebuilds b_i for U2 and s_sk_j for U1 \\ U2 (each
    checked against its public key) and raises SecAggError naming the first node whose
    secret has fewer than t shares.
    """
    u2 = set(masked)
    dropped = sorted(set(u1) - u2)
    if not masked:
        raise SecAggError("no masked inputs to unmask")
    n = int(next(iter(masked.values())).shape[0])
    total = np.zeros(n, dtype=np.uint64)
    for y in masked.values():
        if y.shape != (n,):
            raise SecAggError("masked inputs differ in length")
        total += y
    for i in sorted(u2):
        got = shares[B_SHARE].get(i, [])
        if len(got) < thresholds[i]:
            raise SecAggError(f"self-mask of node {i}: {len(got)} shares, {thresholds[i]} needed")
        total -= prg(shamir.combine(got, thresholds[i]), n)
    for j in dropped:
        got = shares[SK_SHARE].get(j, [])
        if len(got) < thresholds[j]:
            raise SecAggError(f"key of dropped node {j}: {len(got)} shares, {thresholds[j]} needed")
        sk = shamir.combine(got, thresholds[j])
        if public_key_of(sk) != s_pks[j]:
            raise SecAggError(f"rebuilt key of dropped node {j} does not match its public key")
        for i in groups[j]:
            if i in u2:  # survivor i added sign(i, j) * PRG(s_ij): take it back out
                p = pairwise(sk, s_pks[i], server_round, n)
                total = total - p if _sign(i, j) > 0 else total + p
    return total
