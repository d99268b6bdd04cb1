import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sparse_tiny_models import SPARSE_KEYS, Tiny, batch
from torch import nn

from strategies.sparse.engine import DSTConfig, DSTController
from strategies.sparse.layout import unit_rows
from strategies.sparse.masks import MaskError, ones_mask, target_active_count


def unit_counts(c: DSTController) -> dict[str, int]:
    """Active entries of every unit (a layer, or one q/k/v slice of a fused projection)."""
    out = {}
    for n, m in c.mask.items():
        parts = c.slices.get(n, 1)
        for i, rows in enumerate(unit_rows(n, m.shape, parts)):
            out[n if parts == 1 else f"{n}#{i}"] = int(m[rows].sum())
    return out


def planned_counts(c: DSTController, density: float) -> dict[str, int]:
    d = c.planned_densities(density)
    sizes = {}
    for n, m in c.mask.items():
        parts = c.slices.get(n, 1)
        for i, rows in enumerate(unit_rows(n, m.shape, parts)):
            sizes[n if parts == 1 else f"{n}#{i}"] = m[rows].numel()
    return {u: target_active_count(sizes[u], d[u]) for u in sizes}


def train(
    model: nn.Module, c: DSTController, opt: torch.optim.Optimizer, steps: int
) -> list[dict[str, int]]:
    out = []
    for i in range(steps):
        x, y = batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        c.after_backward()
        for n, p in model.named_parameters():
            if n in c.mask and p.grad is not None:
                assert torch.all(p.grad[~c.mask[n]] == 0), n  # masked grads zeroed
        out.append(c.step())
        c.check_invariants()
    return out


def make(rule: str, seed: int = 0, opt: str = "sgd", **kw: Any) -> tuple[Tiny, DSTController]:
    torch.manual_seed(seed)
    model = Tiny()
    o: torch.optim.Optimizer
    if opt == "sgd":
        o = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    elif opt == "adam":
        o = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-2)
    else:
        o = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=1e-2)
    kw.setdefault("embeddings", True)  # Tiny's embedding is sparsified in these tests
    cfg = DSTConfig(rule=rule, density=0.3, update_interval=2, end_fraction=1.0, **kw)
    return model, DSTController(
        model, o, cfg, total_steps=8, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("rule", ["rigl", "set"])
@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_rigl_set_keep_layer_counts_and_zeros(rule: str, opt: str) -> None:
    model, c = make(rule, opt=opt)
    assert list(c.mask) == SPARSE_KEYS
    assert c.slices == {"mha.in_proj_weight": 3}
    counts = unit_counts(c)
    assert counts == planned_counts(c, 0.3)
    before = {n: m.clone() for n, m in c.mask.items()}
    out = train(model, c, c.optimizer, 8)
    assert unit_counts(c) == counts  # per unit: q, k and v slices keep their own budgets
    assert [o["dropped"] > 0 for o in out] == [False, True, False, True, False, True, False, False]
    assert all(o["dropped"] == o["grown"] for o in out)
    assert any(not torch.equal(before[n], c.mask[n]) for n in SPARSE_KEYS)
    assert c.step_count == 8


def test_rigl_exact_gradient_growth_and_state_reset() -> None:
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]]))
    mask = {"weight": torch.tensor([[True, True, False, False], [True, True, False, False]])}
    opt = torch.optim.SGD(lin.parameters(), lr=0.0, momentum=0.9)
    cfg = DSTConfig(
        rule="rigl", density=0.5, drop_fraction=0.5, update_interval=1, end_fraction=1.0
    )
    c = DSTController(lin, opt, cfg, total_steps=100, mask=mask)
    # dL/dW = G: largest |G| at inactive (1, 3) and (0, 2); (0, 0) huge but active -> ignored
    g = torch.tensor([[100.0, 0.0, 7.0, 1.0], [0.5, 0.5, 2.0, 9.0]])
    opt.zero_grad()
    (lin.weight * g).sum().backward()
    c.after_backward()
    assert lin.weight.grad is not None
    assert torch.equal(lin.weight.grad, g * mask["weight"])
    out = c.step()
    # n = round(0.25 * (1 + cos(pi / 100)) * 4) = 2: drop |w| = 1, 2; grow (1, 3), (0, 2)
    assert out == {"dropped": 2, "grown": 2}
    assert c.mask["weight"].tolist() == [[False, False, True, False], [True, True, False, True]]
    assert lin.weight.tolist() == [[0.0, 0.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]]
    buf = opt.state[lin.weight]["momentum_buffer"]
    assert buf[0, 2] == 0 and buf[1, 3] == 0  # grown: fresh state
    assert buf[1, 0] != 0  # kept weights keep their momentum


def test_adam_state_reset_for_grown() -> None:
    model, c = make("set", opt="adam")
    x, y = batch(0)
    c.optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    c.after_backward()
    c.step()  # step 1: state exists, no update
    c.optimizer.zero_grad()
    F.cross_entropy(model(*batch(1)[:1]), batch(1)[1]).backward()
    before = {n: m.clone() for n, m in c.mask.items()}
    c.after_backward()
    out = c.step()  # step 2: update
    assert out["grown"] > 0
    params = dict(model.named_parameters())
    for n in SPARSE_KEYS:
        grown = c.mask[n] & ~before[n]
        st = c.optimizer.state[params[n]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.all(st[key][grown] == 0), (n, key)
        assert torch.all(params[n][grown] == 0)


def test_masked_weights_exactly_zero_with_weight_decay_momentum() -> None:
    lin = nn.Linear(5, 5)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    c = DSTController(lin, opt, DSTConfig(rule="static", density=0.4, distribution="uniform"), 10)
    m = c.mask["weight"]
    assert int(m.sum()) == 10
    for _ in range(5):
        opt.zero_grad()
        lin(torch.randn(3, 5)).pow(2).sum().backward()
        c.after_backward()
        assert c.step() == {"dropped": 0, "grown": 0}
        assert torch.all(lin.weight[~m] == 0.0)
        assert torch.all(lin.weight[m] != 0.0)
    assert torch.equal(c.mask["weight"], m)


def test_dense_rule_is_all_ones_no_updates() -> None:
    model, c = make("dense")
    assert all(bool(m.all()) for m in c.mask.values())
    assert c.density == 1.0
    assert all(o == {"dropped": 0, "grown": 0} for o in train(model, c, c.optimizer, 4))


def test_gmp_prunes_to_schedule_and_never_grows() -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = DSTConfig(
        rule="gmp",
        density=0.2,
        update_interval=2,
        gmp_start_fraction=0.0,
        gmp_end_fraction=0.8,
        embeddings=True,
    )
    c = DSTController(model, opt, cfg, total_steps=10)
    assert c.density == 1.0
    prev = {n: m.clone() for n, m in c.mask.items()}
    densities = []
    for i in range(10):
        x, y = batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        c.after_backward()
        out = c.step()
        assert out["grown"] == 0
        for n in SPARSE_KEYS:
            assert bool((c.mask[n] <= prev[n]).all())  # subset: never regrows
        prev = {n: m.clone() for n, m in c.mask.items()}
        densities.append(c.density)
        c.check_invariants()
    assert densities == sorted(densities, reverse=True)
    # end (step 8): per-unit targets from ERK at density 0.2
    assert unit_counts(c) == planned_counts(c, 0.2)
    assert abs(c.density - 0.2) < 0.01


def test_reproducible_given_seed() -> None:
    masks = []
    for _ in range(2):
        model, c = make("set", seed=3)
        train(model, c, c.optimizer, 4)
        masks.append(c.state_dict()["mask"])
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in SPARSE_KEYS)


def test_rigl_requires_after_backward_at_update_step() -> None:
    model, c = make("rigl")
    for i in range(2):
        c.optimizer.zero_grad()
        x, y = batch(i)
        F.cross_entropy(model(x), y).backward()
        if i == 0:
            c.after_backward()
            c.step()
        else:
            with pytest.raises(RuntimeError, match="after_backward"):
                c.step()


def test_regrow_with_scores_random_and_protected() -> None:
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 5.0, 6.0], [3.0, 4.0, 7.0, 8.0]]))
    mask = {"weight": torch.tensor([[True, True, False, False], [True, True, False, False]])}
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    c = DSTController(lin, opt, DSTConfig(rule="static", density=0.5), 10, mask=mask)
    assert lin.weight[0, 2] == 0  # given mask applied
    scores = {"weight": torch.tensor([[0.0, 0.0, 1.0, 2.0], [0.0, 0.0, 3.0, 0.5]])}
    protected = {
        "weight": torch.tensor([[True, False, False, False], [False, False, False, False]])
    }
    out = c.regrow(0.5, grow_scores=scores, protected=protected)
    # drop 2 lowest unprotected |w|: (0, 1)=2 and (1, 0)=3; grow (1, 2)=3 and (0, 3)=2
    assert out == {"dropped": 2, "grown": 2}
    assert c.mask["weight"].tolist() == [[True, False, False, True], [False, True, True, False]]
    assert lin.weight.tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]]
    out = c.regrow(0.5)  # random grow
    assert out == {"dropped": 2, "grown": 2} and int(c.mask["weight"].sum()) == 4
    with pytest.raises(ValueError, match="fraction"):
        c.regrow(1.5)
    with pytest.raises(MaskError, match="nope"):
        c.regrow(0.5, grow_scores={"nope": torch.zeros(2, 4)})


def test_set_mask_and_state_dict_round_trip() -> None:
    model, c = make("rigl")
    train(model, c, c.optimizer, 3)
    sd = c.state_dict()
    assert set(sd) == {"mask", "step_count"} and sd["step_count"] == 3
    model2, c2 = make("rigl", seed=1)
    c2.load_state_dict(sd)
    assert c2.step_count == 3
    assert all(torch.equal(c2.mask[n], sd["mask"][n]) for n in SPARSE_KEYS)
    c2.check_invariants()
    # set_mask: newly active and newly inactive positions get fresh optimizer state
    params = dict(model.named_parameters())
    new = ones_mask(c.shapes)
    old = {n: m.clone() for n, m in c.mask.items()}
    c.set_mask(new)
    for n in SPARSE_KEYS:
        buf = c.optimizer.state[params[n]]["momentum_buffer"]
        assert torch.all(buf[~old[n]] == 0)
    with pytest.raises(MaskError, match="fc.weight"):
        c.set_mask({**new, "fc.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="step_count"):
        c.load_state_dict({"mask": new})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rule", "magic"),
        ("density", 0.0),
        ("density", 1.2),
        ("distribution", "normal"),
        ("drop_fraction", -0.1),
        ("update_interval", 0),
        ("end_fraction", 2.0),
        ("gmp_start_fraction", 1.0),
        ("gmp_end_fraction", 0.05),
    ],
)
def test_config_validate_names_field(field: str, value: Any) -> None:
    kw: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=f"DSTConfig.{field}"):
        DSTConfig(**kw).validate()
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=f"DSTConfig.{field}"):
        DSTController(lin, torch.optim.SGD(lin.parameters(), lr=0.1), DSTConfig(**kw), 10)


def test_total_steps_validated_and_bad_mask() -> None:
    lin = nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        DSTController(lin, opt, DSTConfig(), 0)
    with pytest.raises(MaskError, match="weight"):
        DSTController(lin, opt, DSTConfig(), 5, mask={"weight": torch.ones(3, 3, dtype=torch.bool)})


def test_transformer_fast_path_sees_masked_weights() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    c = DSTController(layer, opt, DSTConfig(rule="static", density=0.3), 5)
    assert "self_attn.in_proj_weight" in c.mask and "self_attn.out_proj.weight" in c.mask
    assert torch.all(layer.self_attn.in_proj_weight[~c.mask["self_attn.in_proj_weight"]] == 0)
    layer.eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():  # fused fast path (torch._transformer_encoder_layer_fwd)
        fast = layer(x)
    slow = layer(x)  # grad enabled: python path
    assert torch.allclose(fast, slow, atol=1e-5)


def test_predicate_controls_what_is_masked() -> None:
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    c = DSTController(
        model, opt, DSTConfig(rule="static"), 5, predicate=lambda n, t: n == "fc.weight"
    )
    assert list(c.mask) == ["fc.weight"]
    assert math.isclose(c.density, target_active_count(30, 0.1) / 30)
