"""Server-side model averaging: EMA / tail maths, mask restriction, and the strategy wrapper."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation.averaging import AVERAGES, AveragedStrategy, ModelAverage
from tasks.config import AVERAGES as CONFIG_AVERAGES


def _state(v: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), v), "n": torch.tensor(int(v))}


def test_config_names_the_same_averages() -> None:
    assert CONFIG_AVERAGES == AVERAGES


def test_tail_is_the_iterate_before_its_start_then_the_uniform_mean() -> None:
    avg = ModelAverage("tail", start=3)
    served = []
    for r in range(1, 6):
        avg.update(_state(float(r)), r)
        out = avg.value()
        served.append(float(out["w"][0, 0]))
        assert int(out["n"]) == r  # counters: the latest iterate's
        assert out["w"].dtype == torch.float32
    assert served == [1.0, 2.0, 3.0, 3.5, 4.0]


@settings(max_examples=30, deadline=None)
@given(
    decay=st.floats(0.0, 0.95),
    xs=st.lists(st.floats(-10, 10, allow_nan=False), min_size=1, max_size=8),
)
def test_ema_is_bias_corrected_exponential_average(decay: float, xs: list[float]) -> None:
    avg = ModelAverage("ema", decay=decay)
    for r, x in enumerate(xs, start=1):
        avg.update({"w": torch.tensor([x], dtype=torch.float64)}, r)
    t = len(xs)
    weights = [(1 - decay) * decay ** (t - i) for i in range(1, t + 1)]
    expected = sum(w * x for w, x in zip(weights, xs, strict=True)) / sum(weights)
    assert float(avg.value()["w"][0]) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    first = ModelAverage("ema", decay=decay)
    first.update({"w": torch.tensor([xs[0]])}, 1)
    assert torch.equal(first.value()["w"], torch.tensor([xs[0]]))  # round 1 serves x_1


def test_the_average_is_restricted_to_the_final_mask_exactly() -> None:
    # two rounds with different masks: round 1 keeps {0, 1}, round 2 keeps {1, 2}
    avg = ModelAverage("tail", start=1)
    m1 = torch.tensor([True, True, False, False])
    m2 = torch.tensor([False, True, True, False])
    avg.update({"w": torch.where(m1, 2.0, 0.0)}, 1)
    avg.update({"w": torch.where(m2, 4.0, 0.0)}, 2)
    out = avg.value({"w": m2})["w"]
    assert out.tolist() == [0.0, 3.0, 2.0, 0.0]  # index 2: regrown in round 2, (0 + 4) / 2
    assert int((out != 0).sum()) == int(m2.sum())  # exactly the final mask's density
    assert avg.value()["w"].tolist() == [1.0, 3.0, 2.0, 0.0]  # unrestricted: off-mask leaks


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="one of"):
        ModelAverage("none")
    with pytest.raises(ValueError, match="decay"):
        ModelAverage("ema", decay=1.0)
    with pytest.raises(RuntimeError):
        ModelAverage("ema").value()


class _Inner(Strategy):
    """Records what it was asked to train from; returns preset iterates."""

    def __init__(self, iterates: list[float | None]) -> None:
        self.iterates = iterates
        self.trained_from: list[float] = []
        self.mask = {"w": torch.tensor([True, False, True])}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.trained_from.append(float(arrays.to_torch_state_dict()["w"][0]))
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        v = self.iterates[server_round - 1]
        if v is None:
            return None, MetricRecord({"rejected": 1})
        return ArrayRecord({"w": torch.full((3,), v)}), MetricRecord({"round": server_round})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        pass


def test_wrapper_trains_the_iterate_and_serves_the_masked_average() -> None:
    inner = _Inner([2.0, 4.0, None, 6.0])
    wrapped = AveragedStrategy(inner, ModelAverage("tail", start=1), lambda: inner.mask)
    served = ArrayRecord({"w": torch.zeros(3)})  # what Flower's loop holds
    for r in range(1, 5):
        wrapped.configure_train(r, served, ConfigRecord(), None)  # type: ignore[arg-type]
        arrays, metrics = wrapped.aggregate_train(r, [])
        assert metrics is not None
        if arrays is not None:
            served = arrays
        if r == 2:
            assert served.to_torch_state_dict()["w"].tolist() == [3.0, 0.0, 3.0]
    assert inner.trained_from == [0.0, 2.0, 4.0, 4.0]  # the iterate; round 3 was rejected
    assert served.to_torch_state_dict()["w"].tolist() == [4.0, 0.0, 4.0]  # (2 + 4 + 6) / 3
