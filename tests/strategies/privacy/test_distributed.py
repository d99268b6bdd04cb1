"""Distributed client-level DP: clip, noise on the public mask, quantize, ring sum, decode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.privacy.accountant import PrivacyError
from strategies.privacy.client_dp import clip_update
from strategies.privacy.distributed import (
    COUNT_BITS,
    DPSumPlan,
    client_noise_std,
    min_survivors,
)

SHAPES = {"w": (32, 32), "b": (32,)}


def _setup(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    g = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    mask = {"w": torch.rand(SHAPES["w"], generator=gen) < 0.25}
    g["w"] = g["w"] * mask["w"]
    return g, mask


def _clients(g: dict[str, torch.Tensor], n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed + 1)
    return [
        {k: v + 0.05 * (i + 1) * torch.randn(v.shape, generator=gen) for k, v in g.items()}
        for i in range(n)
    ]


def _plan(mask: dict[str, torch.Tensor], **kw: float) -> DPSumPlan:
    args: dict = dict(
        clip=0.5, noise_std=0.0, count_noise_std=0.0, quant_bits=16, num_clients=6, sampled=6
    )
    args.update(kw)
    return DPSumPlan(dict(SHAPES), mask, **args)


def _secure_sum(plan: DPSumPlan, g, locals_, seed: int) -> tuple[dict[str, torch.Tensor], float]:
    rng = np.random.default_rng(seed)
    total = np.zeros(plan.layout().length, dtype=np.uint64)
    for x in locals_:
        v, _ = plan.encode(g, x, None, rng)
        total += v  # the ring sum SecAgg+ unmasks (mod 2^64)
    out = plan.decode(total, g)
    return out.values, float(out.noised_unclipped or 0.0)


def _clipped_mean(plan: DPSumPlan, g, locals_, mask) -> dict[str, torch.Tensor]:
    """Plaintext DP-FedAvg without noise: sum of jointly clipped on-mask deltas / sampled."""
    total = {k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()}
    for x in locals_:
        delta = {k: (x[k] - g[k]).double() * mask.get(k, 1) for k in g}
        clipped, _ = clip_update(delta, plan.clip)
        for k in total:
            total[k] += clipped[k]
    return {k: g[k].double() + total[k] / plan.sampled for k in g}


def test_noise_free_sum_is_the_clipped_mean_within_quantization_error() -> None:
    g, mask = _setup(0)
    plan = _plan(mask)
    locals_ = _clients(g, 5, 0)  # 5 survivors of 6 sampled: the denominator stays 6
    got, _ = _secure_sum(plan, g, locals_, 0)
    want = _clipped_mean(plan, g, locals_, mask)
    for k in g:
        assert torch.max(torch.abs(got[k].double() - want[k])) <= plan.error_bound() + 1e-6
    assert plan.layout().length == int(mask["w"].sum()) + 32 + 2


def test_noise_is_on_the_mask_only_with_the_std_the_accountant_assumes() -> None:
    g, mask = _setup(1)
    z, clip, n_min, survivors, sampled = 1.0, 0.5, 4, 5, 6
    sigma_c = client_noise_std(z, clip, n_min)
    assert sigma_c == pytest.approx(z * clip / 2)
    plan = _plan(mask, clip=clip, noise_std=sigma_c, sampled=sampled)
    locals_ = _clients(g, survivors, 1)
    got, _ = _secure_sum(plan, g, locals_, 7)
    want = _clipped_mean(plan, g, locals_, mask)
    # off the mask: exactly the previous value (zero), no noise
    assert torch.equal(got["w"][~mask["w"]], g["w"][~mask["w"]])
    assert torch.all(got["w"][~mask["w"]] == 0)
    diff = torch.cat([(got["w"].double() - want["w"])[mask["w"]], got["b"].double() - want["b"]])
    # the survivors' noise sums to N(0, (survivors / n_min) (z C)^2) >= (z C)^2; / sampled
    std = z * clip * math.sqrt(survivors / n_min) / sampled
    assert float(diff.std()) == pytest.approx(std, rel=0.1)
    assert float(diff.abs().max()) <= 6 * std + plan.error_bound()
    assert abs(float(diff.mean())) < 4 * std / math.sqrt(diff.numel())


def test_values_beyond_the_quantization_range_wrap_and_the_sum_still_decodes() -> None:
    # noise std far above the clip: many noisy values exceed c_q = C + 4 sigma_c, and they
    # are not clamped (that would change the noise's law); the ring sum is still exact
    g, mask = _setup(2)
    plan = _plan(mask, noise_std=2.0, num_clients=3, sampled=3)
    rng = np.random.default_rng(3)
    locals_ = _clients(g, 3, 2)
    total = np.zeros(plan.layout().length, dtype=np.uint64)
    plain = np.zeros(plan.layout().length - 2)
    for x in locals_:
        v, _ = plan.encode(g, x, None, rng)
        total += v
        plain += v[:-2].view(np.int64)  # the client's own signed quantized values
    assert np.max(np.abs(plain)) < 3 * (2**15 - 1) * 2  # within the ring's spare bit
    got = plan.decode(total, g).values
    on = torch.cat([got["b"], got["w"][mask["w"]]]).double()  # layout order: sorted keys
    base = torch.cat([g["b"], g["w"][mask["w"]]]).double()
    expect = base + torch.from_numpy(plain / (plan.scale * 3))
    assert torch.allclose(on, expect, atol=1e-5)


def test_unclipped_count_is_released_only_with_count_noise() -> None:
    g, mask = _setup(3)
    locals_ = _clients(g, 4, 3)
    norms = []
    for x in locals_:
        delta = {k: (x[k] - g[k]).double() * mask.get(k, 1) for k in g}
        norms.append(clip_update(delta, 1.0)[1])
    unclipped = sum(n <= 1.0 for n in norms)
    assert 0 < unclipped < 4  # the clip splits the clients
    _, none = _secure_sum(_plan(mask, clip=1.0), g, locals_, 0)
    assert none == 0.0
    _, exact = _secure_sum(_plan(mask, clip=1.0, count_noise_std=1e-9), g, locals_, 0)
    assert exact == pytest.approx(unclipped, abs=4 / 2**COUNT_BITS)
    noisy = [
        _secure_sum(_plan(mask, clip=1.0, count_noise_std=0.5), g, locals_, s)[1] for s in range(40)
    ]
    assert np.std(noisy) == pytest.approx(0.5 * 2, rel=0.35)  # 4 shares of std 0.5
    assert np.mean(noisy) == pytest.approx(unclipped, abs=0.6)


@settings(max_examples=15, deadline=None)
@given(
    clip=st.floats(0.01, 5.0),
    n=st.integers(1, 6),
    bits=st.integers(8, 24),
    seed=st.integers(0, 1000),
)
def test_noise_free_decode_error_is_within_the_bound(clip: float, n: int, bits: int, seed: int):
    g, mask = _setup(seed)
    plan = _plan(mask, clip=clip, quant_bits=bits, num_clients=n, sampled=n)
    locals_ = _clients(g, n, seed)
    got, _ = _secure_sum(plan, g, locals_, seed)
    want = _clipped_mean(plan, g, locals_, mask)
    for k in g:
        assert torch.max(torch.abs(got[k].double() - want[k])) <= plan.error_bound() + 1e-6


def test_min_survivors_and_noise_share_checks() -> None:
    assert [min_survivors(n, 0.5) for n in (1, 2, 5, 100)] == [1, 2, 3, 51]
    with pytest.raises(PrivacyError):
        client_noise_std(1.0, 1.0, 0)
    with pytest.raises(ValueError, match="clip"):
        _plan({"w": torch.ones(SHAPES["w"], dtype=torch.bool)}, clip=0.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"v": torch.ones(32, dtype=torch.bool)},  # names no model tensor
        {"w": torch.ones(32, 31, dtype=torch.bool)},  # the wrong shape
    ],
)
def test_both_secure_plans_refuse_a_mask_that_does_not_fit_the_model(bad) -> None:  # type: ignore[no-untyped-def]
    from strategies.secure.crypto import SecAggError
    from strategies.secure.sparse_sum import SparseSumPlan, check_mask_shapes

    good = {"w": torch.ones(SHAPES["w"], dtype=torch.bool)}
    check_mask_shapes(good, dict(SHAPES))  # fits: no error
    with pytest.raises(SecAggError, match="does not match the model"):
        _plan(bad)
    with pytest.raises(SecAggError, match="does not match the model"):
        SparseSumPlan(dict(SHAPES), bad, False, 1.0, 16, 4096, 6)
