"""sgd_step: bit for bit torch's SGD.step on plain CPU groups, and declines everything else."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.optimizer import register_optimizer_step_post_hook

from strategies.sparse.sgd_step import sgd_step

SHAPES = [(5, 3), (3,), (2, 5), (4,)]


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(params: list[torch.nn.Parameter], seed: int, skip: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = None if i == skip else torch.randn(p.shape, generator=g)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 1000),
    lr=st.sampled_from([0.1, 0.05, 1e-3]),
    momentum=st.sampled_from([0.0, 0.5, 0.9]),
    dampening=st.sampled_from([0.0, 0.1]),
    weight_decay=st.sampled_from([0.0, 5e-4, 0.1]),
    steps=st.integers(1, 4),
    skip=st.integers(-1, len(SHAPES) - 1),
    two_groups=st.booleans(),
)
def test_same_bits_as_torch_step(
    seed: int,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    steps: int,
    skip: int,
    two_groups: bool,
) -> None:
    ref, fast = _params(seed), _params(seed)

    def opt(ps: list[torch.nn.Parameter]) -> torch.optim.SGD:
        kw = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay}
        if two_groups:
            groups = [{"params": ps[:2]}, {"params": ps[2:], "lr": lr / 2}]
            return torch.optim.SGD(groups, **kw)  # type: ignore[arg-type]
        return torch.optim.SGD(ps, **kw)  # type: ignore[arg-type]

    o_ref, o_fast = opt(ref), opt(fast)
    for step in range(steps):
        _grads(ref, seed + step, skip)
        _grads(fast, seed + step, skip)
        o_ref.step()
        assert sgd_step(o_fast)
    for a, b in zip(ref, fast, strict=True):
        assert torch.equal(a, b)
        sa, sb = o_ref.state.get(a, {}), o_fast.state.get(b, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k])


def test_declines_what_it_does_not_replicate() -> None:
    ps = _params(0)
    _grads(ps, 1, -1)
    before = [p.detach().clone() for p in ps]
    declined = [
        torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
        torch.optim.SGD(ps, lr=0.1, maximize=True),
        torch.optim.SGD(ps, lr=0.1, foreach=True),
        torch.optim.SGD(ps, lr=torch.tensor(0.1)),
        torch.optim.Adam(ps, lr=0.1),
    ]
    hooked = torch.optim.SGD(ps, lr=0.1)
    hooked.register_step_pre_hook(lambda *_: None)
    for opt in [*declined, hooked]:
        assert not sgd_step(opt)
    handle = register_optimizer_step_post_hook(lambda *_: None)
    try:
        assert not sgd_step(torch.optim.SGD(ps, lr=0.1))
    finally:
        handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(ps, before, strict=True))  # nothing moved
    assert sgd_step(torch.optim.SGD(ps, lr=0.1))
