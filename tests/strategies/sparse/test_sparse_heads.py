"""Attention heads as multi-row channel units: kept whole by the engine, removed by condense."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.sparse.condense import condense
from strategies.sparse.engine import DSTConfig, DSTController
from strategies.sparse.units import Consumer, UnitGroup, dead_rows, dead_units, unit_row_index
from tasks.models import build_model


def test_unit_row_index_of_heads_and_plain_groups() -> None:
    heads = UnitGroup("w", rows_per_unit=2, blocks=3)
    idx = unit_row_index(heads, 12)  # 2 heads x (q, k, v) x 2 rows
    assert idx.tolist() == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]]
    assert unit_row_index(UnitGroup("w"), 3).tolist() == [[0], [1], [2]]
    mask = {"w": torch.ones(12, 5, dtype=torch.bool)}
    mask["w"][[2, 3, 6, 7, 10, 11]] = False  # head 1 fully masked
    mask["w"][0] = False  # one row of head 0: head 0 stays alive
    assert dead_units(mask, heads).tolist() == [False, True]
    assert dead_rows(mask, heads).nonzero().squeeze(1).tolist() == [2, 3, 6, 7, 10, 11]
    with pytest.raises(ValueError, match="do not split"):
        heads.units(10)  # 10 rows are not heads of 3 x 2 rows
    assert Consumer("o", spatial=2).spatial == 2


@settings(max_examples=12, deadline=None)
@given(
    st.sampled_from([1, 2, 4]),
    st.floats(0.2, 0.9),
    st.sampled_from(["uniform", "erk"]),
    st.integers(0, 2**16),
)
def test_channel_rule_keeps_heads_whole_and_counts(
    nhead: int, density: float, dist: str, seed: int
) -> None:
    torch.manual_seed(seed)
    model = build_model("transformer", (1, 4, 4), 3, options={"d_model": 8, "nhead": nhead})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = DSTConfig(
        rule="channel", density=density, distribution=dist, update_interval=1, end_fraction=1
    )
    gen = torch.Generator().manual_seed(seed)
    ctl = DSTController(model, opt, cfg, total_steps=4, generator=gen)
    groups = [g for g in model.unit_groups() if g.blocks == 3]  # type: ignore[operator]
    counts = {g.producer: int(ctl.mask[g.producer].sum()) for g in groups}
    for step in range(4):
        x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(5) % 3).backward()
        ctl.after_backward()
        ctl.step()
        for g in groups:
            m = ctl.mask[g.producer]
            rows = m.any(1)[unit_row_index(g, m.shape[0])]  # [heads, 3 * head_dim]
            assert bool((rows.all(1) | ~rows.any(1)).all())  # every head whole
            assert bool(m[m.any(1)].all())  # a live head's rows are fully active
            assert int(m.sum()) == counts[g.producer]  # prune + grow keep the count
            bias = dict(model.named_parameters())[g.shift[0]]
            assert bool((bias.detach()[dead_rows(ctl.mask, g)] == 0).all())
    model.eval()
    small = condense(model, ctl.mask)
    x = torch.randn(3, 1, 4, 4)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5, rtol=0)
    for i, g in enumerate(groups):
        alive = int((~dead_units(ctl.mask, g)).sum())
        w = small.get_parameter(f"encoder.layers.{i}.self_attn.in_proj_weight")
        assert w.shape[0] == 3 * (8 // nhead) * alive
