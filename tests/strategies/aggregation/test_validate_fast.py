"""`check_update`'s one-pass check gives the per-key loop's verdict, reason for reason."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies.aggregation import validate
from strategies.aggregation.merge import ClientUpdate
from strategies.aggregation.validate import ModelSpec, check_update

STATE = {
    "a.weight": torch.zeros(3, 4),
    "a.bias": torch.zeros(3),
    "b.weight": torch.zeros(2, 3, dtype=torch.float64),
    "steps": torch.zeros((), dtype=torch.int64),
}
MASKED = ("a.weight", "b.weight")
FAULTS = ("none", "nan", "inf", "big", "outside", "dtype", "shape", "int_big", "mask_dtype")


def _update(faults: list[tuple[str, str]]) -> ClientUpdate:
    values = {k: torch.ones_like(v) for k, v in STATE.items()}
    mask = {k: torch.ones(STATE[k].shape, dtype=torch.bool) for k in MASKED}
    for k in MASKED:
        mask[k].view(-1)[0] = False
        values[k].view(-1)[0] = 0
    for key, fault in faults:
        t = values[key]
        if fault == "nan" and t.dtype.is_floating_point:
            t.view(-1)[-1] = float("nan")
        elif fault == "inf" and t.dtype.is_floating_point:
            t.view(-1)[-1] = float("inf")
        elif fault == "big" and t.dtype.is_floating_point:
            t.view(-1)[-1] = 1e7
        elif fault == "outside" and key in mask:
            t.view(-1)[0] = 0.5
        elif fault == "dtype":
            values[key] = t.to(torch.float16)
        elif fault == "shape":
            values[key] = torch.ones(5)
        elif fault == "int_big" and key == "steps":
            values[key] = torch.tensor(2**60)
        elif fault == "mask_dtype" and key in mask:
            mask[key] = mask[key].to(torch.uint8)
    return ClientUpdate(1, values, mask, 4)


SPEC = ModelSpec.from_state(STATE, {k: torch.ones_like(STATE[k], dtype=torch.bool) for k in MASKED})


@given(st.lists(st.tuples(st.sampled_from(sorted(STATE)), st.sampled_from(FAULTS)), max_size=3))
def test_one_pass_and_per_key_checks_agree(faults: list[tuple[str, str]]) -> None:
    update = _update(faults)
    fast = check_update(update, SPEC)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validate, "_all_clean", lambda *_: False)  # the per-key loop alone
        slow = check_update(update, SPEC)
    assert fast == slow


def test_a_clean_update_passes_and_each_fault_is_named() -> None:
    assert check_update(_update([]), SPEC) is None
    assert "NaN or Inf" in str(check_update(_update([("a.bias", "nan")]), SPEC))
    assert "outside the mask" in str(check_update(_update([("b.weight", "outside")]), SPEC))
    assert "beyond 2^53" in str(check_update(_update([("steps", "int_big")]), SPEC))
