import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.sparse.density import erk_densities, layer_density_rule, uniform_densities
from strategies.sparse.masks import random_mask, target_active_count


def test_uniform() -> None:
    shapes = {"a": torch.Size([4, 4]), "b": torch.Size([2, 3])}
    assert uniform_densities(shapes, 0.3) == {"a": 0.3, "b": 0.3}
    with pytest.raises(ValueError, match="density"):
        uniform_densities(shapes, 0.0)
    with pytest.raises(ValueError, match="density"):
        uniform_densities(shapes, 1.5)


def test_erk_known_values() -> None:
    # raw scores: a [10, 10] -> 20/100 = 0.2, b [100, 10] -> 110/1000 = 0.11
    shapes = {"a": torch.Size([10, 10]), "b": torch.Size([100, 10])}
    d = erk_densities(shapes, 0.1)
    # eps = 0.1 * 1100 / (0.2 * 100 + 0.11 * 1000) = 110 / 130
    eps = 110 / 130
    assert d["a"] == pytest.approx(0.2 * eps)
    assert d["b"] == pytest.approx(0.11 * eps)
    assert d["a"] * 100 + d["b"] * 1000 == pytest.approx(110)


def test_erk_overflow_to_dense() -> None:
    # A tiny layer [2, 2] (raw 1.0) next to a big one [100, 100] (raw 0.02) at density 0.5:
    # eps * 1.0 > 1 -> the small one goes dense and the big one absorbs the rest.
    shapes = {"small": torch.Size([2, 2]), "big": torch.Size([100, 100])}
    d = erk_densities(shapes, 0.5)
    assert d["small"] == 1.0
    assert d["big"] == pytest.approx((0.5 * 10004 - 4) / 10000)


def test_erk_conv_kernel_counts_kernel_dims() -> None:
    d = erk_densities({"conv": torch.Size([8, 4, 3, 3]), "fc": torch.Size([10, 72])}, 0.2)
    raw_conv = (8 + 4 + 3 + 3) / (8 * 4 * 9)
    raw_fc = 82 / 720
    assert d["conv"] / d["fc"] == pytest.approx(raw_conv / raw_fc)


def test_erk_density_one_is_dense_and_rule_lookup() -> None:
    shapes = {"a": torch.Size([3, 3])}
    assert erk_densities(shapes, 1.0) == {"a": 1.0}
    assert layer_density_rule("erk") is erk_densities
    assert layer_density_rule("uniform") is uniform_densities
    with pytest.raises(ValueError, match="'nope'"):
        layer_density_rule("nope")


shape_st = st.lists(st.integers(1, 40), min_size=2, max_size=4)


@settings(max_examples=60, deadline=None)
@given(
    shapes_list=st.lists(shape_st, min_size=1, max_size=6),
    density=st.floats(0.01, 1.0),
    power=st.sampled_from([0.5, 1.0]),
)
def test_erk_sums_and_bounds(shapes_list: list[list[int]], density: float, power: float) -> None:
    shapes = {f"l{i}": torch.Size(s) for i, s in enumerate(shapes_list)}
    d = erk_densities(shapes, density, power_scale=power)
    numels = {k: math.prod(s) for k, s in shapes.items()}
    total = sum(numels.values())
    assert all(0.0 < v <= 1.0 for v in d.values())
    assert sum(d[k] * numels[k] for k in shapes) == pytest.approx(density * total, rel=1e-6)
    active = sum(target_active_count(numels[k], d[k]) for k in shapes)
    assert abs(active - density * total) <= len(shapes)
    m = random_mask(shapes, d, torch.Generator().manual_seed(0))
    assert sum(int(v.sum()) for v in m.values()) == active
