"""The server's fallback initial mask covers exactly the tensors the clients' DST engine masks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from client.local import round_controller
from server.strategy_factory import build_strategy, fit_strategy
from strategies.aggregation.strategy import SparseFedAvg
from tasks.config import LeanfedConfig
from tasks.models import transformer


class Tied(nn.Module):
    """An embedding tied to the output layer: one storage under two state_dict names."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.body = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "transformer": transformer((1, 8, 8), 3, 0, d_model=16, nhead=2, num_layers=1),
        "tied": Tied(),
    }


def _server_mask(model: nn.Module, cfg: LeanfedConfig) -> dict[str, torch.Tensor]:
    strategy = build_strategy(cfg)
    assert isinstance(strategy, SparseFedAvg) and strategy.mask is None
    fit_strategy(strategy, model, cfg)
    return strategy._ensure_mask(dict(model.state_dict()))


@pytest.mark.parametrize("name", ["transformer", "tied"])
@pytest.mark.parametrize(("rule", "density"), [("dense", 1.0), ("static", 0.5)])
def test_server_fallback_mask_matches_client_engine(name: str, rule: str, density: float) -> None:
    model = _models()[name]
    cfg = dataclasses.replace(LeanfedConfig(), dst_rule=rule, dst_density=density)
    server = _server_mask(model, cfg)
    _, dense = round_controller(model, cfg, None, torch.Generator().manual_seed(0))
    assert set(server) == set(dense.mask)
    # The client's engine takes the server's mask as it is (same keys, same shapes).
    _, held = round_controller(model, cfg, server, torch.Generator().manual_seed(0))
    assert set(held.mask) == set(server)
    assert all(torch.equal(held.mask[k], server[k]) for k in server)
    if name == "transformer":  # the fused [3E, E] in_proj is masked, norms and biases are not
        assert any(k.endswith("in_proj_weight") for k in server)
        assert not any("norm" in k or k.endswith("bias") for k in server)
    else:  # one mask per storage, under the first kernel name; the embedding alias has none
        assert set(server) == {"body.weight", "head.weight"}
    if density == 1.0:
        assert all(bool(m.all()) for m in server.values())


def test_fallback_needs_the_selection() -> None:
    strategy = SparseFedAvg(density=0.5)
    with pytest.raises(ValueError, match="sparse_keys or an initial_mask"):
        strategy._ensure_mask({"w": torch.zeros(2, 2)})
