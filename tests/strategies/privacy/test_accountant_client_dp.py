import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.privacy.accountant import (
    PrivacyError,
    adaptive_value_noise,
    epsilon,
    noise_multiplier_for,
)
from strategies.privacy.client_dp import AdaptiveClip, clip_update, private_sum_mean


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    e = [epsilon(1.1, 0.01, t, 1e-5) for t in (0, 100, 1000, 10000)]
    assert e[0] == 0.0 and e[1] < e[2] < e[3]
    assert epsilon(2.0, 0.01, 1000, 1e-5) < epsilon(1.0, 0.01, 1000, 1e-5)
    # Abadi et al. 2016's MNIST setting (q = 0.01, z = 4, 10k steps) is about eps = 1.2 at
    # delta = 1e-5 with the moments accountant; RDP gives a similar figure.
    assert 0.5 < epsilon(4.0, 0.01, 10000, 1e-5) < 1.5


@settings(max_examples=3, deadline=None)
@given(target=st.sampled_from([1.0, 3.0, 8.0]), steps=st.integers(10, 500))
def test_noise_for_epsilon_is_the_inverse(target: float, steps: int) -> None:
    z = noise_multiplier_for(target, 0.05, steps, 1e-5)
    assert epsilon(z, 0.05, steps, 1e-5) <= target
    assert epsilon(z - 0.01, 0.05, steps, 1e-5) > target * 0.98


def test_adaptive_value_noise_formula_and_bounds() -> None:
    z = adaptive_value_noise(1.0, 5.0)
    assert math.isclose((z**-2 + (2 * 5.0) ** -2) ** -0.5, 1.0)
    with pytest.raises(PrivacyError, match="count noise"):
        adaptive_value_noise(1.0, 0.4)


def test_clip_and_private_mean_keep_the_mask() -> None:
    delta = {"w": torch.full((2, 2), 3.0), "b": torch.full((2,), 4.0)}
    clipped, norm = clip_update(delta, 1.0)
    assert math.isclose(norm, math.sqrt(4 * 9 + 2 * 16))
    assert math.isclose(math.sqrt(sum(float(v.pow(2).sum()) for v in clipped.values())), 1.0)
    public = {"w": torch.tensor([[True, False], [False, True]])}
    shapes = {"w": torch.Size([2, 2]), "b": torch.Size([2])}
    gen = torch.Generator().manual_seed(0)
    out = private_sum_mean([clipped, clipped], shapes, public, 1.0, 1.0, 4, gen)
    assert out["w"][0, 1] == clipped["w"][0, 1] * 2 / 4  # no noise off the public mask
    assert out["w"][0, 0] != clipped["w"][0, 0] * 2 / 4  # noise on it
    no_noise = private_sum_mean([clipped], shapes, public, 1.0, 1e-12, 2, gen)
    assert torch.allclose(no_noise["b"], clipped["b"] / 2)


def test_adaptive_clip_moves_toward_the_quantile() -> None:
    gen = torch.Generator().manual_seed(0)
    ac = AdaptiveClip(clip=1.0, quantile=0.5, lr=0.2)
    for _ in range(60):
        ac.update([0.1, 0.2, 0.3, 0.4, 5.0, 6.0, 7.0, 8.0], 8, gen)
    assert 0.4 <= ac.clip <= 5.0  # between the 4th and 5th norm: the median
    ac.load_state_dict(ac.state_dict())
