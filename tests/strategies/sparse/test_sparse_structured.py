import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation.merge import ClientUpdate, consensus_mask
from strategies.sparse.density import erk_densities, uniform_densities
from strategies.sparse.engine import DSTConfig, DSTController
from strategies.sparse.masks import MaskError, sparsifiable_shapes
from strategies.sparse.prune_grow import LayerState, check_prune_grow, get_drop_rule, get_grow_rule
from strategies.sparse.scores import channel_gradient_score, channel_l2_score
from strategies.sparse.structured import (
    ablate_units,
    channel_drop,
    channel_grow,
    check_structure,
    row_counts,
    structured_init,
    structured_vote,
)
from strategies.sparse.units import unit_groups
from tasks.models import build_model


def test_channel_scores_and_exact_channel_update() -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    assert torch.equal(channel_l2_score(w), torch.tensor([5.0, 0.0, 1.0, 0.0]))
    assert torch.equal(channel_gradient_score(-w), channel_l2_score(w))
    mask = torch.tensor([[True, True], [False, False], [True, True], [False, False]])
    dropped = channel_drop(mask, channel_l2_score(w), 2)  # 2 entries = 1 unit: unit 2 (norm 1)
    assert dropped.tolist() == [[False, False], [False, False], [True, True], [False, False]]
    g = torch.tensor([[0.0, 0.0], [1.0, 1.0], [9.0, 9.0], [2.0, 0.0]])
    grown = channel_grow(mask & ~dropped, channel_gradient_score(g), dropped)
    # unit 2 has the largest gradient but was just dropped: unit 3 (norm 2) beats unit 1 (1.41)
    assert grown.tolist() == [[False, False], [False, False], [False, False], [True, True]]


@st.composite
def layer(draw: st.DrawFn) -> tuple[torch.Size, float, int, int]:
    units = draw(st.integers(2, 8))
    fan_in = 4 * draw(st.integers(1, 4))
    return (
        torch.Size((units, fan_in)),
        draw(st.floats(0.1, 0.9)),
        draw(st.integers(0, 40)),
        draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None)
@given(layer(), st.sampled_from(["channel", "fanin", "nm"]), st.booleans())
def test_structured_prune_grow_keeps_structure_and_counts(
    spec: tuple[torch.Size, float, int, int], kind: str, random_grow: bool
) -> None:
    shape, density, n, seed = spec
    gen = torch.Generator().manual_seed(seed)
    mask = structured_init({"w": shape}, {"w": density}, {"w": kind}, gen)["w"]
    check_structure(mask, kind)
    w = torch.randn(shape, generator=gen) * mask
    grad = torch.randn(shape, generator=gen)
    state = LayerState("w", w, mask, grad, gen, kind)
    dropped = get_drop_rule("structured-magnitude")(state, n)
    after = mask & ~dropped
    grow = get_grow_rule("structured-random" if random_grow else "structured-gradient")
    grown = grow(state, after, dropped, int(dropped.sum()))
    new = after | grown
    check_prune_grow(mask, dropped, grown, new)  # count kept, disjoint, grown were inactive
    check_structure(new, kind)
    if kind != "channel":  # constant fan-in: every unit keeps its number of inputs
        assert torch.equal(row_counts(new), row_counts(mask))
    else:
        assert int(new.reshape(shape[0], -1).all(1).sum()) == int(mask.all(1).sum())


def test_check_structure_rejects() -> None:
    with pytest.raises(MaskError, match="partially"):
        check_structure(torch.tensor([[True, False], [True, True]]), "channel")
    with pytest.raises(MaskError, match="fan-in"):
        check_structure(torch.tensor([[True, False], [True, True]]), "fanin")
    with pytest.raises(MaskError, match="2:4"):
        check_structure(torch.tensor([[True, True, True, False]]), "nm")


@pytest.mark.parametrize("rule", ["channel", "srigl", "nm"])
@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_engine_structured_rules_keep_invariants(rule: str, distribution: str) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    cfg = DSTConfig(
        rule=rule,
        density=0.3,
        distribution=distribution,
        update_interval=1,
        end_fraction=1.0,
        drop_fraction=0.5,
    )
    c = DSTController(model, opt, cfg, total_steps=6, generator=torch.Generator().manual_seed(1))
    kinds = {
        "channel": {"fc1.weight": "channel", "fc2.weight": "channel", "fc3.weight": "fanin"},
        "srigl": dict.fromkeys(c.shapes, "fanin"),
        "nm": dict.fromkeys(c.shapes, "nm"),
    }[rule]
    assert c.structure == kinds
    rule_fn = erk_densities if distribution == "erk" else uniform_densities
    dens = rule_fn(sparsifiable_shapes(model), 0.3)
    counts = {n: int(m.sum()) for n, m in c.mask.items()}
    if rule == "channel":  # whole units: round(d * units) rows of fan_in entries
        assert counts["fc1.weight"] == round(dens["fc1.weight"] * 128) * 16
    changed = 0
    for i in range(6):
        x = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(8) % 3).backward()
        c.after_backward()
        before = {n: m.clone() for n, m in c.mask.items()}
        out = c.step()
        assert out["dropped"] == out["grown"]
        changed += out["dropped"]
        c.check_invariants()
        for n, m in c.mask.items():
            check_structure(m, kinds[n])
            if rule == "srigl" and n in ("fc1.weight", "fc2.weight"):
                # neuron ablation: the count may fall by less than one unit's share
                units = int(before[n].any(1).sum())
                assert counts[n] - units < int(m.sum()) <= counts[n]
                counts[n] = int(m.sum())
            else:
                assert int(m.sum()) == counts[n]
            if kinds[n] != "channel" and not (rule == "srigl" and n != "fc3.weight"):
                assert torch.equal(row_counts(m), row_counts(before[n]))
        for g in unit_groups(model):  # dead units' biases held at exactly 0
            dead = ~c.mask[g.producer].any(1)
            assert torch.all(model.get_parameter(g.shift[0])[dead] == 0)
    assert changed > 0
    # regrow events (drift, readjustment rounds) keep the structure too
    grads = {n: torch.randn(s) for n, s in c.shapes.items()}
    assert c.regrow(0.5, grads)["grown"] > 0
    for n, m in c.mask.items():
        check_structure(m, kinds[n])


@pytest.mark.parametrize("kind", ["channel", "fanin", "nm"])
def test_structured_consensus_vote(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    shape = torch.Size((6, 8))
    masks = [structured_init({"w": shape}, {"w": 0.5}, {"w": kind}, gen)["w"] for _ in range(3)]
    ups = [
        ClientUpdate(i, {"w": torch.randn(shape)}, {"w": m}, 10 + i) for i, m in enumerate(masks)
    ]
    tie = torch.randn(shape, generator=gen)
    out = consensus_mask(ups, {"w": 0.5}, {"w": tie}, structure={"w": kind})["w"]
    check_structure(out, kind)
    assert int(out.sum()) == 24
    votes = sum(u.num_examples * u.mask["w"].double() for u in ups)
    if kind == "channel":  # the 3 units with the most votes win
        top = torch.argsort(votes.sum(1), descending=True, stable=True)[:3]
        assert sorted(out.all(1).nonzero().squeeze(1).tolist()) == sorted(top.tolist())
    # ties in votes go to the larger |value|: a unanimous vote is reproduced exactly
    same = [ClientUpdate(i, {"w": tie}, {"w": masks[0]}, 5) for i in range(2)]
    assert torch.equal(
        consensus_mask(same, {"w": 0.5}, {"w": tie}, structure={"w": kind})["w"], masks[0]
    )
    assert torch.equal(structured_vote(votes, kind, 0.5, tie), out)


def test_srigl_ablation_exact() -> None:
    w = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.1, 0.2, 0.0, 0.0], [0.0, 0.0, 3.0, 6.0]])
    mask = w != 0
    g = torch.tensor([[0.0, 0.0, 9.0, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    # RigL would keep 6, 5, 4, 3, 0.2 and grow (0, 2): salient per unit 3, 1, 2;
    # unit 1 has 1 < 0.6 * 2 salient weights -> ablated; the others get fan-in 6 // 2 = 3.
    out = ablate_units(mask, w, g, n_update=1, gamma=0.6)
    assert out.int().tolist() == [[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]]
    assert torch.equal(ablate_units(mask, w, g, n_update=1, gamma=0.1), mask)  # nothing to ablate


@settings(max_examples=40, deadline=None)
@given(layer(), st.floats(0.0, 1.0))
def test_srigl_ablation_properties(spec: tuple[torch.Size, float, int, int], gamma: float) -> None:
    shape, density, n, seed = spec
    gen = torch.Generator().manual_seed(seed)
    mask = structured_init({"w": shape}, {"w": density}, {"w": "fanin"}, gen)["w"]
    w = torch.randn(shape, generator=gen) * mask
    out = ablate_units(mask, w, torch.randn(shape, generator=gen), n, gamma)
    check_structure(out, "fanin")  # constant fan-in after ablation
    units_before, units_after = int(mask.any(1).sum()), int(out.any(1).sum())
    assert 1 <= units_after <= units_before
    assert bool((out.any(1) <= mask.any(1)).all())  # ablated units never come back here
    assert int(mask.sum()) - units_after < int(out.sum()) <= int(mask.sum())
