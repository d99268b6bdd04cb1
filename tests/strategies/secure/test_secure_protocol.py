"""SecAgg+ maths: Shamir sharing, key agreement, masking and unmasking with dropouts (no flwr)."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.secure import protocol as P
from strategies.secure import shamir
from strategies.secure.crypto import SecAggError, agree, decrypt, encrypt, generate_keypair, prg


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(0, 4), st.binary(min_size=32, max_size=32), st.randoms())
def test_any_t_shares_rebuild_the_secret(t: int, extra: int, secret: bytes, rnd) -> None:
    shares = shamir.split(secret, t, t + extra)
    pick = rnd.sample(shares, t)
    assert shamir.combine(pick, t) == secret


def test_fewer_than_t_shares_are_refused_and_t_minus_one_reveal_nothing_fixed() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, 5)
    with pytest.raises(SecAggError, match="3 needed"):
        shamir.combine(shares[:2], 3)
    # Interpolating t-1 shares as if t-1 sufficed never yields the secret.
    with contextlib.suppress(SecAggError):  # or is not even a 32-byte value
        assert shamir.combine(shares[:2], 2) != secret
    with pytest.raises(SecAggError, match="68 bytes"):
        shamir.combine([b"\x01" * 10, shares[0]], 1)


def test_key_agreement_is_symmetric_and_ciphertexts_are_authenticated() -> None:
    (a_sk, a_pk), (b_sk, b_pk) = generate_keypair(), generate_keypair()
    k = agree(a_sk, b_pk, b"x")
    assert k == agree(b_sk, a_pk, b"x") and k != agree(b_sk, a_pk, b"y")
    blob = encrypt(k, b"secret", b"hdr", os.urandom(12))
    assert decrypt(k, blob, b"hdr") == b"secret"
    with pytest.raises(SecAggError, match="authentication"):
        decrypt(k, blob, b"other header")
    with pytest.raises(SecAggError):
        agree(a_sk, b"\x00" * 32, b"x")  # low-order point


def test_prg_is_deterministic_and_seed_dependent() -> None:
    s = os.urandom(32)
    assert np.array_equal(prg(s, 5), prg(s, 5)) and prg(s, 5).dtype == np.uint64
    assert not np.array_equal(prg(s, 5), prg(os.urandom(32), 5))


def test_graph_is_symmetric_and_regular() -> None:
    nodes = [(1 << 63) + 17 * i for i in range(12)]
    g = P.neighbour_graph(nodes, 4, seed=3)
    assert all(len(v) == 4 for v in g.values())
    assert all(i in g[j] for i, vs in g.items() for j in vs)
    assert all(len(v) == 11 for v in P.neighbour_graph(nodes, 0, seed=3).values())
    assert P.threshold_for(10, 0.5) == 6 and P.threshold_for(3, 0.5) == 2


def _run(n: int, k: int, drop: set[int], length: int = 50, fraction: float = 0.5):
    """Run stages 0-3 for n clients; clients in `drop` vanish after key sharing."""
    nodes = [(1 << 63) + 1000 * i + 7 for i in range(n)]
    graph = P.neighbour_graph(nodes, k, seed=0)
    states, pks = {}, {}
    for i in nodes:
        states[i], c_pk, s_pk = P.advertise(4, i)
        pks[i] = (c_pk, s_pk)
    groups = {i: tuple(sorted((i, *graph[i]))) for i in nodes}
    thresholds = {i: P.threshold_for(len(groups[i]), fraction) for i in nodes}
    inbox: dict[int, dict[int, bytes]] = {i: {} for i in nodes}
    for i in nodes:
        for dst, ct in P.share_keys(
            states[i], {j: pks[j] for j in groups[i]}, thresholds[i]
        ).items():
            inbox[dst][i] = ct
    rng = np.random.default_rng(0)
    xs = {i: rng.integers(0, 2**20, length).astype(np.uint64) for i in nodes}
    masked = {}
    for i in nodes:
        if i in drop:
            continue
        P.receive_shares(states[i], inbox[i], {j: pks[j][0] for j in groups[i]})
        masked[i] = P.mask_input(states[i], xs[i], nodes)
    shares: dict[int, dict[int, list[bytes]]] = {P.B_SHARE: {}, P.SK_SHARE: {}}
    for i in masked:
        for src, kind, sh in P.unmask_shares(states[i], masked, drop):
            shares[kind].setdefault(src, []).append(sh)
    total = P.unmask_sum(
        4, masked, groups, thresholds, {i: pks[i][1] for i in nodes}, nodes, shares
    )
    expect = sum((xs[i] for i in masked), np.zeros(length, np.uint64))
    return total, expect, masked, xs


@pytest.mark.parametrize(("n", "k", "dropped"), [(5, 0, 0), (6, 0, 2), (10, 4, 2), (10, 0, 4)])
def test_unmasked_sum_equals_the_plain_sum_with_dropouts(n: int, k: int, dropped: int) -> None:
    nodes = [(1 << 63) + 1000 * i + 7 for i in range(n)]
    total, expect, masked, xs = _run(n, k, set(nodes[1 : 1 + dropped]))
    assert np.array_equal(total, expect)
    for i, y in masked.items():  # what the server holds per client is not the input
        assert not np.array_equal(y, xs[i])


def test_more_than_n_minus_t_dropouts_cannot_be_unmasked() -> None:
    nodes = [(1 << 63) + 1000 * i + 7 for i in range(6)]
    # complete graph of 6: t = 4, so 3 dropouts leave 3 < 4 survivors: clients refuse
    with pytest.raises(SecAggError, match="too few|needed"):
        _run(6, 0, set(nodes[:3]))


def test_client_refuses_a_second_unmask_and_overlapping_lists() -> None:
    st0, c_pk, s_pk = P.advertise(1, 5)
    others = {j: (generate_keypair()[1], generate_keypair()[1]) for j in (6, 7)}
    P.share_keys(st0, {5: (c_pk, s_pk), **others}, 2)
    with pytest.raises(SecAggError, match="both"):
        P.unmask_shares(st0, [5, 6], [6])
    P.unmask_shares(st0, [5, 6, 7], [])
    with pytest.raises(SecAggError, match="already"):
        P.unmask_shares(st0, [5, 6], [7])
    st1, c1, s1 = P.advertise(1, 5)
    with pytest.raises(SecAggError, match="exceed half"):
        P.share_keys(st1, {5: (c1, s1), **others}, 1)
