"""`check_update`'s one-pass check gives the per-key loop's verdict, reason for reason."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies.aggregation import validate
from strategies.aggregation.merge import ClientUpdate
from strategies.aggregation.validate import ModelSpec, check_update, update_norm

STATE = {
    "a.weight": torch.zeros(3, 4),
    "a.bias": torch.zeros(3),
    "b.weight": torch.zeros(2, 3, dtype=torch.float64),
    "steps": torch.zeros((), dtype=torch.int64),
}
MASKED = ("a.weight", "b.weight")
FAULTS = (
    "none",
    "nan",
    "inf",
    "big",
    "outside",
    "dtype",
    "shape",
    "int_big",
    "mask_dtype",
    "nan_first",  # the first entry: a running max over tensors must not drop a NaN
    "neg_zero_outside",  # -0.0 off the mask is a zero: accepted
    "nan_outside",  # NaN off the mask: refused
)


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
        elif fault == "nan_first" and t.dtype.is_floating_point:
            t.view(-1)[1 if key in mask else 0] = float("nan")
        elif fault == "neg_zero_outside" and key in mask:
            t.view(-1)[0] = -0.0
        elif fault == "nan_outside" and key in mask:
            t.view(-1)[0] = float("nan")
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


def _torch_norm(update: ClientUpdate, previous: dict[str, torch.Tensor]) -> float:
    """The norm as a float64 torch reference computes it (update_norm's definition)."""
    total = 0.0
    for key, v in update.values.items():
        diff = v.to(torch.float64) - previous[key].to(torch.float64)
        if key in update.mask:
            diff = diff[update.mask[key]]
        total += float((diff * diff).sum())
    return total**0.5


@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.float64]))
def test_update_norm_matches_the_float64_reference(seed: int, prev_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    update = _update([])
    for v in update.values.values():
        if v.dtype.is_floating_point:
            v.copy_(torch.randn(v.shape, generator=g, dtype=v.dtype) * 10)
    previous = {
        k: (torch.randn(v.shape, generator=g) * 10).to(
            prev_dtype if v.is_floating_point() else v.dtype
        )
        for k, v in STATE.items()
    }
    got, want = update_norm(update, previous), _torch_norm(update, previous)
    assert abs(got - want) <= 1e-12 * max(1.0, want)
    assert update_norm(update, previous) == got  # the same bits every time
