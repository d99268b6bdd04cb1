import pytest
import torch
import torch.nn.functional as F
from torch import nn

from strategies.sparse.condense import FanInLinear, condense, condensed_mask, expand
from strategies.sparse.engine import DSTConfig, DSTController
from strategies.sparse.masks import apply_mask_to_state
from strategies.sparse.units import Consumer, UnitGroup
from tasks.models import build_model


class BNCNN(nn.Module):
    """conv -> BN -> ReLU -> pool -> conv -> BN -> ReLU -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # [B, 8, 4, 4]
        x = F.relu(self.bn2(self.conv2(x)))  # [B, 6, 4, 4]
        return self.fc(x.flatten(1))

    def unit_groups(self) -> list[UnitGroup]:
        bn = ("weight", "running_var")
        return [
            UnitGroup(
                "conv1.weight",
                ("conv1.bias", "bn1.bias", "bn1.running_mean"),
                tuple(f"bn1.{n}" for n in bn),
                (Consumer("conv2.weight"),),
            ),
            UnitGroup(
                "conv2.weight",
                ("conv2.bias", "bn2.bias", "bn2.running_mean"),
                tuple(f"bn2.{n}" for n in bn),
                (Consumer("fc.weight", spatial=16),),
            ),
        ]


MODELS = {
    "cnn": (lambda: build_model("cnn", (1, 12, 12), 4), (1, 12, 12)),
    "transformer": (lambda: build_model("transformer", (1, 6, 6), 4), (1, 6, 6)),
    "gnn": (lambda: build_model("gnn", (1, 5, 5), 4), (1, 5, 5)),
    "mlp": (lambda: build_model("mlp", (1, 4, 4), 4), (1, 4, 4)),
    "bn-cnn": (BNCNN, (1, 8, 8)),
}


def trained(
    name: str, rule: str, dist: str = "erk"
) -> tuple[nn.Module, dict[str, torch.Tensor], tuple[int, ...]]:
    """A model after a few structured-DST steps (BN running stats and dead biases included)."""
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cfg = DSTConfig(rule=rule, density=0.25, distribution=dist, update_interval=2, end_fraction=1)
    c = DSTController(model, opt, cfg, total_steps=5, generator=torch.Generator().manual_seed(0))
    for i in range(5):
        x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(6) % 3).backward()
        c.after_backward()
        c.step()
    return model.eval(), c.mask, shape


CASES = [(name, "channel") for name in MODELS] + [("cnn", "srigl"), ("transformer", "srigl")]


@pytest.mark.parametrize(("name", "rule"), CASES)
def test_condensed_matches_masked_model(name: str, rule: str) -> None:
    model, mask, shape = trained(name, rule)
    small = condense(model, mask)
    x = torch.randn(7, *shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref, out = model(x), small(x)
    assert out.shape == ref.shape
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    n_full = sum(p.numel() for p in model.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < n_full if rule == "channel" else n_small <= n_full
    # expand: full shapes back; kept values identical, the rest from the template
    full = expand(small, model.state_dict())
    state = apply_mask_to_state(model.state_dict(), mask)
    assert set(full) == set(state)
    for k, v in state.items():
        assert torch.equal(full[k], v), k
    small_mask = condensed_mask(small, mask)
    small_state = small.state_dict()
    for k, m in small_mask.items():
        assert m.shape == small_state[k].shape


def test_channel_rule_gives_smaller_dense_layers_and_fanin_head() -> None:
    model, mask, _ = trained("cnn", "channel", "uniform")
    small = condense(model, mask, fanin_max_density=0.5)
    alive1 = int(mask["conv1.weight"].reshape(16, -1).any(1).sum())
    alive2 = int(mask["conv2.weight"].reshape(32, -1).any(1).sum())
    alive3 = int(mask["fc1.weight"].any(1).sum())
    assert isinstance(small.conv2, nn.Conv2d)
    assert tuple(small.conv2.weight.shape) == (alive2, alive1, 3, 3)
    assert small.conv2.in_channels == alive1 and small.conv2.out_channels == alive2
    assert tuple(small.fc1.weight.shape) == (alive3, alive2 * 9)
    assert isinstance(small.fc2, FanInLinear)  # constant fan-in rows of the classifier
    live = mask["fc1.weight"].any(1)  # fc2 reads only live fc1 units: padded to the busiest row
    k = int(mask["fc2.weight"][:, live].sum(1).max())
    assert tuple(small.fc2.values.shape) == (4, k) and tuple(small.fc2.index.shape) == (4, k)
    assert bool((small.fc2.index < alive3).all())
    # expand without a template: removed units read as zeros (biases were zero already)
    full = expand(small)
    assert torch.equal(full["conv1.bias"], model.conv1.bias.detach())


def test_bn_dead_channels_zero_shift_and_condense_keeps_live_nonzero_units() -> None:
    model, mask, shape = trained("bn-cnn", "channel")
    dead = ~mask["conv1.weight"].reshape(8, -1).any(1)
    assert bool(dead.any())
    assert torch.all(model.bn1.bias[dead] == 0) and torch.all(model.bn1.running_mean[dead] == 0)
    # A dead unit whose bias is NOT zero outputs a constant: condense must keep it.
    with torch.no_grad():
        model.conv1.bias[dead.nonzero()[0]] = 0.3
    small = condense(model, mask)
    assert small.conv1.weight.shape[0] == int((~dead).sum()) + 1
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5, rtol=0)


def test_fanin_linear_exact() -> None:
    values = torch.tensor([[2.0, 3.0], [1.0, 0.0]])
    index = torch.tensor([[0, 2], [1, 0]])
    lin = FanInLinear(values, index, torch.tensor([0.5, -1.0]))
    x = torch.tensor([[1.0, 10.0, 100.0]])
    assert lin(x).tolist() == [[2.0 + 300.0 + 0.5, 10.0 - 1.0]]
    with pytest.raises(ValueError, match="differ"):
        FanInLinear(values, index[:, :1], None)


def test_channel_rule_keeps_attention_heads_whole_and_condense_removes_dead_heads() -> None:
    from strategies.sparse.condensed_transformer import CondensedAttention
    from strategies.sparse.units import unit_row_index

    model, mask, shape = trained("transformer", "channel")
    groups = {g.producer: g for g in model.unit_groups()}  # type: ignore[operator]
    name = "encoder.layers.0.self_attn.in_proj_weight"
    index = unit_row_index(groups[name], 192)  # 4 heads x (3 x 16) rows
    assert index.shape == (4, 48) and index[1, 16].item() == 64 + 16
    alive_rows = mask[name].any(1)[index]  # [heads, 48]
    # whole heads: every head is all-active or all-inactive in q, k and v
    assert bool((alive_rows.all(1) | ~alive_rows.any(1)).all())
    heads = int(alive_rows.all(1).sum())
    assert 1 <= heads < 4
    assert bool(mask[name][index[alive_rows.all(1)].reshape(-1)].any(1).all())
    small = condense(model, mask)
    attn = small.get_submodule("encoder.layers.0.self_attn")
    assert isinstance(attn, CondensedAttention) and attn.heads == heads
    assert tuple(attn.in_proj_weight.shape) == (48 * heads, 64)
    assert tuple(attn.out_proj.weight.shape) == (64, 16 * heads)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5, rtol=0)
    full = expand(small, model.state_dict())
    assert torch.equal(full[name], model.state_dict()[name])
    # the condensed transformer trains: a step changes the kept q/k/v rows
    small.train()
    F.cross_entropy(small(x), torch.arange(3)).backward()
    assert attn.in_proj_weight.grad is not None and bool(attn.in_proj_weight.grad.any())


@pytest.mark.parametrize("norm_first", [True, False])
def test_condensed_encoder_matches_torch_with_masks(norm_first: bool) -> None:
    from strategies.sparse.condensed_transformer import CondensedEncoder

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True, norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
    enc.eval()
    small = CondensedEncoder(enc).eval()
    x = torch.randn(3, 5, 8)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True  # sequence 0 has 3 real tokens
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": pad}, {"mask": causal}):
            ref = enc(x, **kw)
            out = small(x, **kw)
            keep = ~pad if "src_key_padding_mask" in kw else torch.ones(3, 5, dtype=torch.bool)
            assert torch.allclose(out[keep], ref[keep], atol=1e-5), kw
        small.train()  # training path (module calls, dropout p=0) computes the same
        assert torch.allclose(small(x), enc(x), atol=1e-5)
