"""A process's reused optimizer and controller train exactly as freshly built ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from client import local
from client.statics import work_model
from strategies.sparse.masks import Mask
from tasks.config import LeanfedConfig

CFG = LeanfedConfig(dataset="digits", model="mlp", num_partitions=4, seed=5, local_steps=4)
SHAPE, CLASSES = (64,), 10


def _mask(model: torch.nn.Module, seed: int) -> Mask:
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=g) < 0.3
        for n, p in model.named_parameters()
        if p.dim() == 2
    }


def _round(seed: int, server_round: int, reuse: bool) -> tuple[dict, Mask | None, float]:
    if not reuse:
        local._LAST.clear()
    model = work_model(CFG, SHAPE, CLASSES)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(24, 64, generator=g), torch.randint(0, 10, (24,), generator=g)
    with torch.no_grad():  # a received model: other values than the template's
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    out = local.local_round(model, x, y, CFG, server_round, _mask(model, seed), g)
    return {k: v.clone() for k, v in model.state_dict().items()}, out.mask, out.loss


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 4)), min_size=2, max_size=5))
def test_reused_rounds_equal_fresh_ones(rounds: list[tuple[int, int]]) -> None:
    """Mask rounds (regrow) and fixed-mask rounds in any order: same bits either way."""
    reused = [_round(seed, r, reuse=True) for seed, r in rounds]
    fresh = [_round(seed, r, reuse=False) for seed, r in rounds]
    for (sa, ma, la), (sb, mb, lb) in zip(reused, fresh, strict=True):
        assert la == lb
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert ma is not None and mb is not None
        assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_reuse_needs_the_same_model_parameters_and_config() -> None:
    local._LAST.clear()
    model = work_model(CFG, SHAPE, CLASSES)
    g = torch.Generator()
    opt, ctl = local.round_controller(model, CFG, _mask(model, 1), g)
    assert local.round_controller(model, CFG, _mask(model, 2), g) == (opt, ctl)
    assert not opt.state  # cleared for the new round
    other = LeanfedConfig(dataset="digits", model="mlp", num_partitions=4, seed=5, local_lr=0.01)
    assert local.round_controller(model, other, _mask(model, 2), g)[0] is not opt
    model.fc1.weight.requires_grad_(False)  # another set of trainable parameters
    try:
        assert local.round_controller(model, other, _mask(model, 2), g)[0] is not opt
    finally:
        model.fc1.weight.requires_grad_(True)
    assert local.round_controller(model, CFG, None, g)[1].config.rule == "dense"


@pytest.fixture(autouse=True)
def _forget() -> None:
    local._LAST.clear()
