"""DST engine options: initial masks, overrides, exclusions, ERK power, AMP and own loops."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from strategies.sparse.density import erk_densities
from strategies.sparse.engine import DSTConfig, DSTController
from strategies.sparse.layout import plan_densities, unit_shapes
from strategies.sparse.masks import MaskError, target_active_count
from strategies.sparse.saliency import saliency_mask, saliency_scores


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def test_magnitude_init_keeps_largest_per_layer() -> None:
    model = mlp()
    c = DSTController(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DSTConfig(rule="static", density=0.5, distribution="uniform", init="magnitude"),
        total_steps=1,
    )
    w = model[0].weight.detach()
    m = c.mask["0.weight"]
    assert int(m.sum()) == 24
    assert float(w[m].abs().min()) > 0
    # every kept |w| >= every dropped |w| (the original weights, before masking)
    torch.manual_seed(0)
    orig = nn.Linear(6, 8).weight.detach().abs()
    assert float(orig[m].min()) >= float(orig[~m].max())


def test_snip_scores_are_grad_times_weight_and_mask_keeps_top() -> None:
    model = mlp()
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])

    def loss_fn(mdl: nn.Module) -> torch.Tensor:
        return F.cross_entropy(mdl(x), y)

    params = {"0.weight": model[0].weight, "2.weight": model[2].weight}
    scores = saliency_scores("snip", model, params, loss_fn)
    loss_fn(model).backward()
    for n, p in params.items():
        assert p.grad is not None
        assert torch.allclose(scores[n], (p.grad * p).abs().detach())
    mask = saliency_mask(scores, {"0.weight": 0.25, "2.weight": 0.5})
    assert int(mask["0.weight"].sum()) == 12 and int(mask["2.weight"].sum()) == 12
    kept, dropped = scores["0.weight"][mask["0.weight"]], scores["0.weight"][~mask["0.weight"]]
    assert float(kept.min()) >= float(dropped.max())


def test_grasp_scores_are_weight_times_hessian_gradient() -> None:
    # L(w) = 0.5 * sum(a * w^2) (+ a linear term): g = a*w + b, H = diag(a), Hg = a*(a*w + b)
    lin = nn.Linear(3, 1, bias=False)
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([0.5, -1.0, 0.0])

    def loss_fn(mdl: nn.Module) -> torch.Tensor:
        w = mdl.weight[0]
        return 0.5 * (a * w * w).sum() + (b * w).sum()

    scores = saliency_scores("grasp", lin, {"weight": lin.weight}, loss_fn)
    w = lin.weight.detach()[0]
    assert torch.allclose(scores["weight"][0], w * a * (a * w + b), atol=1e-6)


def test_snip_controller_needs_a_batch() -> None:
    model = mlp()
    with pytest.raises(MaskError, match="needs a mini-batch"):
        DSTController(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DSTConfig(rule="rigl", density=0.5, init="snip"),
            total_steps=2,
        )


def test_exclusion_and_override_patterns() -> None:
    model = mlp()
    cfg = DSTConfig(
        rule="static", density=0.5, distribution="uniform", density_overrides=(("2*", 1.0),)
    )
    c = DSTController(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, total_steps=1)
    assert bool(c.mask["2.weight"].all())  # fixed dense by the override
    # the rest carries what is left: 0.5 * 72 - 24 = 12 of 48
    assert int(c.mask["0.weight"].sum()) == 12
    cfg = DSTConfig(rule="static", density=0.5, exclude=("0",))
    c = DSTController(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, total_steps=1)
    assert list(c.mask) == ["2.weight"]
    with pytest.raises(MaskError, match="leave density"):
        plan_densities({"a": (10, 10), "b": (10, 10)}, 0.2, overrides={"a": 0.9})


@settings(max_examples=40, deadline=None)
@given(
    density=st.floats(0.05, 1.0),
    power=st.floats(0.0, 2.0),
    dims=st.lists(st.tuples(st.integers(3, 30), st.integers(3, 30)), min_size=1, max_size=4),
)
def test_planned_budget_is_the_overall_density(
    density: float, power: float, dims: list[tuple[int, int]]
) -> None:
    shapes = {f"l{i}": (3 * a, b) for i, (a, b) in enumerate(dims)}
    slices = {"l0": 3}  # a fused projection
    d = plan_densities(shapes, density, slices=slices, erk_power_scale=power)
    units = unit_shapes(shapes, slices)
    assert set(d) == set(units)
    total = sum(a * b for a, b in units.values())
    active = sum(d[u] * a * b for u, (a, b) in units.items())
    assert abs(active - density * total) <= 1e-6 * total
    assert all(0.0 < v <= 1.0 for v in d.values())
    if power == 0.0 and density < 1.0:  # power 0: ERK is uniform
        assert all(abs(v - density) < 1e-9 for v in d.values())


def test_erk_power_scale_is_passed_through() -> None:
    shapes = {"a": (4, 4), "b": (40, 40)}
    planned = plan_densities(shapes, 0.3, erk_power_scale=0.5)
    assert planned == erk_densities(shapes, 0.3, power_scale=0.5)


def test_grad_scaler_and_external_optimizer_step() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    cfg = DSTConfig(rule="rigl", density=0.5, update_interval=1, end_fraction=1.0)
    c = DSTController(model, opt, cfg, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    counts = {n: int(m.sum()) for n, m in c.mask.items()}
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    c.after_backward()
    out = c.step(scaler=scaler)
    assert out["grown"] > 0 and c.step_count == 1
    c.check_invariants()
    # An overflowing step: the scaler skips it and the controller makes no topology update.
    before = {n: m.clone() for n, m in c.mask.items()}
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model[0].weight.grad[0, 0] = float("inf")  # type: ignore[index]
    c.after_backward()
    assert c.step(scaler=scaler) == {"dropped": 0, "grown": 0}
    assert all(torch.equal(before[n], c.mask[n]) for n in before)
    assert c.step_count == 2
    # A loop that steps the optimizer itself (e.g. a custom optimizer wrapper).
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    c.after_backward()
    opt.step()
    c.after_optimizer_step()
    c.check_invariants()
    assert {n: int(m.sum()) for n, m in c.mask.items()} == counts
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_units_of_fused_projection_keep_their_own_counts() -> None:
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.ModuleDict({"attn": mha})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    cfg = DSTConfig(rule="set", density=0.25, update_interval=1, end_fraction=1.0)
    c = DSTController(model, opt, cfg, total_steps=5)
    m = c.mask["attn.in_proj_weight"]
    planned = c.planned_densities(0.25)
    for i in range(3):
        assert int(m[8 * i : 8 * (i + 1)].sum()) == target_active_count(
            64, planned[f"attn.in_proj_weight#{i}"]
        )
