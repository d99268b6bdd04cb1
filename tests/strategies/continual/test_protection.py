"""Protection of important weights: freeze selection, forbidden drop, zero grads, EWC penalty."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from strategies.continual.protection import ImportanceAccumulator, ProtectionMask


def tiny() -> nn.Linear:
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        # weight [2, 3]
        lin.weight.copy_(torch.tensor([[0.5, -3.0, 0.1], [2.0, 0.0, -1.0]]))
    return lin


def test_consolidate_freezes_top_magnitude_active_weights() -> None:
    lin = tiny()
    mask = {"weight": torch.tensor([[True, True, True], [True, False, True]])}
    prot = ProtectionMask.for_mask(mask)
    # 5 active, fraction 0.4 -> k = round(2.0) = 2: |-3.0| and |2.0| freeze.
    newly = prot.consolidate(dict(lin.state_dict()), mask, fraction=0.4)
    assert newly == {"weight": 2}
    assert torch.equal(
        prot.frozen["weight"], torch.tensor([[False, True, False], [True, False, False]])
    )
    # Second experience: 3 free active weights, fraction 0.5 -> round(1.5) = 2 (banker's
    # rounding in Python gives 2): |-1.0| and |0.5| join; 0.1 stays free.
    prot.consolidate(dict(lin.state_dict()), mask, fraction=0.5)
    assert torch.equal(
        prot.frozen["weight"], torch.tensor([[True, True, False], [True, False, True]])
    )
    assert prot.frozen_count() == 4 and prot.experiences == 2


def test_consolidate_with_importance_scores() -> None:
    lin = tiny()
    mask = {"weight": torch.ones(2, 3, dtype=torch.bool)}
    scores = {"weight": torch.tensor([[9.0, 0.0, 8.0], [0.0, 0.0, 0.0]])}
    prot = ProtectionMask.for_mask(mask)
    prot.consolidate(dict(lin.state_dict()), mask, fraction=2 / 6, scores=scores)
    assert torch.equal(
        prot.frozen["weight"], torch.tensor([[True, False, True], [False, False, False]])
    )


def test_forbidden_drop_and_protected_drop_scores() -> None:
    prot = ProtectionMask({"w": torch.Size([4])})
    prot.frozen["w"] = torch.tensor([False, True, False, True])
    assert torch.equal(prot.forbidden_drop()["w"], prot.frozen["w"])
    scores = prot.protect_drop_scores({"w": torch.tensor([0.1, 0.2, 0.3, 0.4]), "b": torch.ones(2)})
    inf = float("inf")
    assert torch.equal(scores["w"], torch.tensor([0.1, inf, 0.3, inf]))
    assert torch.equal(scores["b"], torch.ones(2))  # unprotected tensors pass through
    # The lowest-2 drop set can only pick unfrozen entries.
    assert torch.topk(scores["w"], 2, largest=False).indices.sort().values.tolist() == [0, 2]
    assert prot.frozen_outside({"w": torch.tensor([True, False, True, True])}) == 1


def test_zero_grads_and_restore_make_frozen_weights_exactly_fixed() -> None:
    lin = tiny()
    mask = {"weight": torch.ones(2, 3, dtype=torch.bool)}
    prot = ProtectionMask.for_mask(mask)
    prot.consolidate(dict(lin.state_dict()), mask, fraction=1 / 6)  # freezes -3.0 only
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    before = lin.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        lin(torch.ones(4, 3)).sum().backward()
        prot.zero_frozen_grads(lin)
        assert lin.weight.grad is not None and lin.weight.grad[0, 1] == 0.0
        opt.step()
        prot.restore_frozen(lin)
    assert lin.weight[0, 1].item() == before[0, 1].item() == -3.0
    assert not torch.equal(lin.weight[1], before[1])  # the rest trains


def test_ewc_penalty_exact() -> None:
    lin = tiny()
    mask = {"weight": torch.ones(2, 3, dtype=torch.bool)}
    prot = ProtectionMask.for_mask(mask)
    assert prot.penalty(lin).item() == 0.0  # no importance yet
    fisher = {"weight": torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.5, 0.0]])}
    prot.consolidate(dict(lin.state_dict()), mask, fraction=0.0, scores=fisher)
    with torch.no_grad():
        lin.weight += torch.tensor([[1.0, 5.0, -1.0], [3.0, 2.0, 0.0]])
    # 0.5 * strength * (1*1^2 + 0*5^2 + 2*(-1)^2 + 0*3^2 + 0.5*2^2 + 0) = 0.5*2*(1+2+2) = 5
    pen = prot.penalty(lin, strength=2.0)
    assert pen.item() == pytest.approx(5.0)
    pen.backward()
    # d/dw = strength * F * (w - w*) = 2 * [[1, 0, -2], [0, 1, 0]]
    assert lin.weight.grad is not None
    assert torch.allclose(lin.weight.grad, torch.tensor([[2.0, 0.0, -4.0], [0.0, 2.0, 0.0]]))


def test_importance_accumulator_taylor_and_fisher() -> None:
    lin = tiny()
    x = torch.tensor([[1.0, 2.0, -1.0]])
    taylor = ImportanceAccumulator(["weight"], "taylor")
    fisher = ImportanceAccumulator(["weight"], "fisher")
    for _ in range(2):
        lin.zero_grad()
        lin(x).sum().backward()  # dL/dW = [[1, 2, -1], [1, 2, -1]]
        taylor.accumulate(lin)
        fisher.accumulate(lin)
    w = lin.weight.detach()
    g = torch.tensor([[1.0, 2.0, -1.0], [1.0, 2.0, -1.0]])
    assert torch.allclose(taylor.mean()["weight"], (w * g).abs())
    assert torch.allclose(fisher.mean()["weight"], g * g)
    with pytest.raises(ValueError, match="kind"):
        ImportanceAccumulator(["weight"], "l1")


def test_state_roundtrip_and_errors() -> None:
    lin = tiny()
    mask = {"weight": torch.ones(2, 3, dtype=torch.bool)}
    prot = ProtectionMask.for_mask(mask)
    prot.consolidate(
        dict(lin.state_dict()), mask, fraction=0.5, scores={"weight": torch.ones(2, 3)}
    )
    other = ProtectionMask.for_mask(mask)
    other.load_state_dict(prot.state_dict())
    assert torch.equal(other.frozen["weight"], prot.frozen["weight"])
    assert other.penalty(lin).item() == prot.penalty(lin).item() == 0.0
    with pytest.raises(KeyError, match="weight"):
        prot.consolidate({}, mask, 0.1)
    with pytest.raises(ValueError, match="fraction"):
        prot.consolidate(dict(lin.state_dict()), mask, 1.5)
    with pytest.raises(ValueError, match="shape"):
        prot.frozen_outside({"weight": torch.ones(3, 2, dtype=torch.bool)})
