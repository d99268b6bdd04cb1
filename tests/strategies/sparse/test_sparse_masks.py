import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from strategies.sparse.masks import (
    MaskError,
    active_count,
    apply_mask,
    apply_mask_to_state,
    default_sparsifiable,
    layer_densities,
    mask_density,
    mask_from_bytes,
    mask_to_bytes,
    ones_mask,
    pack_mask,
    random_mask,
    sparsifiable_shapes,
    unpack_mask,
    validate_mask,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 6, 3)
        self.norm = nn.LayerNorm(6)
        self.bn = nn.BatchNorm1d(6)
        self.mha = nn.MultiheadAttention(6, 2)
        self.fc = nn.Linear(6, 3)


def test_default_predicate_selects_weight_matrices_only() -> None:
    shapes = sparsifiable_shapes(Net())
    assert list(shapes) == [
        "emb.weight",
        "conv.weight",
        "mha.in_proj_weight",
        "mha.out_proj.weight",
        "fc.weight",
    ]
    assert shapes["conv.weight"] == torch.Size([6, 4, 3])
    assert not default_sparsifiable("x.norm.weight", torch.zeros(3, 3))
    assert not default_sparsifiable("fc.bias", torch.zeros(3))


def test_custom_predicate() -> None:
    shapes = sparsifiable_shapes(Net(), predicate=lambda n, t: n.startswith("fc."))
    assert list(shapes) == ["fc.weight", "fc.bias"]


def test_random_mask_exact_counts_and_reproducible() -> None:
    shapes = {"a": torch.Size([4, 5]), "b": torch.Size([3, 3])}
    m1 = random_mask(shapes, {"a": 0.25, "b": 0.01}, torch.Generator().manual_seed(1))
    m2 = random_mask(shapes, {"a": 0.25, "b": 0.01}, torch.Generator().manual_seed(1))
    assert int(m1["a"].sum()) == 5
    assert int(m1["b"].sum()) == 1  # at least one active
    assert all(torch.equal(m1[k], m2[k]) for k in shapes)
    assert active_count(m1) == 6
    assert mask_density(m1) == pytest.approx(6 / 29)
    assert layer_densities(m1) == {"a": 0.25, "b": 1 / 9}
    with pytest.raises(MaskError, match="b"):
        random_mask(shapes, {"a": 0.5})


def test_apply_mask_zeroes_in_place() -> None:
    lin = nn.Linear(3, 2)
    m = {"weight": torch.tensor([[True, False, True], [False, False, True]])}
    apply_mask(lin, m)
    assert torch.all(lin.weight[~m["weight"]] == 0)
    assert torch.all(lin.weight[m["weight"]] != 0)
    with pytest.raises(MaskError, match="nope"):
        apply_mask(lin, {"nope": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(MaskError, match="weight"):
        apply_mask(lin, {"weight": torch.ones(3, 2, dtype=torch.bool)})


def test_apply_mask_to_state_returns_new_dict() -> None:
    state = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    m = {"w": torch.tensor([[True, False], [False, True]])}
    out = apply_mask_to_state(state, m)
    assert torch.equal(out["w"], torch.eye(2))
    assert torch.equal(state["w"], torch.ones(2, 2))  # input untouched
    assert out["b"] is state["b"]


def test_validate_mask_errors_name_the_key() -> None:
    shapes = {"a": torch.Size([2, 2]), "b": torch.Size([3])}
    good = ones_mask(shapes)
    validate_mask(good, shapes)
    with pytest.raises(MaskError, match="missing.*'b'"):
        validate_mask({"a": good["a"]}, shapes)
    with pytest.raises(MaskError, match="unexpected.*'c'"):
        validate_mask({**good, "c": good["b"]}, shapes)
    with pytest.raises(MaskError, match="a: mask dtype"):
        validate_mask({**good, "a": torch.ones(2, 2)}, shapes)
    with pytest.raises(MaskError, match=r"b: mask shape \(4,\)"):
        validate_mask({**good, "b": torch.ones(4, dtype=torch.bool)}, shapes)
    with pytest.raises(MaskError, match="a: mask has no active"):
        validate_mask({**good, "a": torch.zeros(2, 2, dtype=torch.bool)}, shapes)
    with pytest.raises(MaskError, match="exceeds max_density"):
        validate_mask(good, shapes, max_density=0.5)
    half = {"a": torch.tensor([[True, False], [False, False]]), "b": torch.tensor([1, 0, 0]).bool()}
    with pytest.raises(MaskError, match="below min_density"):
        validate_mask(half, shapes, min_density=0.5)
    validate_mask(half, shapes, max_density=2 / 7, min_density=2 / 7)


def test_pack_mask_length_and_bit_order() -> None:
    t = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    data = pack_mask(t)
    assert data == bytes([0b00000001, 0b00000010])  # little bit order
    assert torch.equal(unpack_mask(data, (10,)), t)
    with pytest.raises(MaskError, match="needs 2 bytes, got 3"):
        unpack_mask(data + b"\x00", (10,))
    with pytest.raises(MaskError, match="bool"):
        pack_mask(torch.ones(3))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_round_trip(shape: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g) < 0.4
    data = pack_mask(t)
    assert len(data) == math.ceil(t.numel() / 8)
    assert torch.equal(unpack_mask(data, tuple(shape)), t)


def test_mask_bytes_round_trip_and_key_errors() -> None:
    shapes = {"a": torch.Size([3, 5]), "b": torch.Size([2, 2, 2])}
    m = random_mask(shapes, {"a": 0.4, "b": 0.5}, torch.Generator().manual_seed(0))
    d = mask_to_bytes(m)
    back = mask_from_bytes(d, shapes)
    assert all(torch.equal(back[k], m[k]) for k in shapes)
    with pytest.raises(MaskError, match="missing"):
        mask_from_bytes({"a": d["a"]}, shapes)
    with pytest.raises(MaskError, match="^a: "):
        mask_from_bytes({**d, "a": d["a"][:1]}, shapes)


def test_off_masks_equal_the_complement_and_follow_changes() -> None:
    from strategies.sparse.masks import OffMasks

    off = OffMasks()
    g = torch.Generator().manual_seed(0)
    m = torch.rand(4, 5, generator=g) < 0.3
    first = off("w", m)
    assert torch.equal(first, ~m)
    assert off("w", m) is first  # the same tensor, unchanged: reused
    m[0, 0] = not bool(m[0, 0])  # changed in place: a fresh complement
    assert torch.equal(off("w", m), ~m)
    other = m.clone()  # equal values, another tensor: computed for that tensor
    assert torch.equal(off("w", other), ~other) and off("w", other) is not first
    assert torch.equal(off("v", ~m), m)  # per name


def test_controller_masks_with_a_mask_changed_in_place() -> None:
    from strategies.sparse.engine import DSTConfig, DSTController

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ctl = DSTController(model, opt, DSTConfig(rule="static", density=0.5), total_steps=4)
    name = next(iter(ctl.mask))
    ctl._apply()  # caches the complement of the current mask
    with torch.no_grad():
        ctl._params[name].fill_(1.0)
    ctl.mask[name][0, :] = False  # in place: row 0 now masked everywhere
    ctl._apply()
    assert torch.equal(ctl._params[name].detach() != 0, ctl.mask[name])
    ctl.check_invariants()
