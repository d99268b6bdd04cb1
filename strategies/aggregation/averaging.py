"""Server-side averaging of the global model over rounds (EMA or a Polyak tail), as a wrapper.

The served model is an average of the rounds' global models (the iterates), while the clients
keep training from the latest iterate: Polyak & Juditsky 1992 (tail averaging), De et al. 2022
("Unlocking high-accuracy differentially private image classification through scale": an EMA of
the DP-SGD iterates). Averaging outputs of a DP mechanism is post-processing: it costs no
privacy. `ModelAverage` is the maths (torch only); `AveragedStrategy` wraps ANY Flower strategy
(SparseFedAvg, its DP and SecAgg+ subclasses, the dense Flower baseline) without touching its
round: ``configure_train`` hands the inner strategy the latest iterate, ``aggregate_train``
folds the new iterate into the average and returns the average, so Flower's loop evaluates,
sends for federated evaluation and returns the averaged model.

Sparse runs: the average is restricted to the CURRENT consensus mask (zero off it), so the
served model is exactly as sparse as the iterate; a weight regrown late averages in the zeros
it had before (its average is shrunk towards 0, not extrapolated).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["AVERAGES", "AveragedStrategy", "ModelAverage"]

AVERAGES = ("none", "ema", "tail")
Tensors = dict[str, torch.Tensor]


class ModelAverage:
    """Running average of the iterates x_1, x_2, ... (one per round), float64.

    ``ema``: a_t = decay a_{t-1} + (1 - decay) x_t, served a_t / (1 - decay^t) (bias-corrected
    as Adam's moments, Kingma & Ba 2015, so round 1 serves x_1 exactly).
    ``tail``: the uniform mean of x_start .. x_t for t >= start; before ``start``, x_t itself.
    Both are acc_t = a acc_{t-1} + x_t b, weight_t = a weight_{t-1} + b; served acc / weight.
    Non-floating-point tensors (counters) are served as the latest iterate's.
    """

    def __init__(self, kind: str, decay: float = 0.9, start: int = 1) -> None:
        if kind not in AVERAGES[1:]:
            raise ValueError(f"average must be one of {AVERAGES[1:]}, got {kind!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"average decay must be in [0, 1), got {decay}")
        self.kind, self.decay, self.start = kind, decay, start
        self.acc: Tensors = {}
        self.weight = 0.0
        self.latest: Tensors = {}

    def update(self, state: Mapping[str, torch.Tensor], server_round: int) -> None:
        """Fold in round ``server_round``'s iterate ``state``."""
        if self.kind == "ema":
            a, b = self.decay, 1.0 - self.decay
        else:  # tail: restart at ``start`` (and before it serve the iterate), then sum
            a, b = (1.0 if server_round > self.start else 0.0), 1.0
        self.latest = {k: v.detach().clone() for k, v in state.items()}
        for k, v in state.items():
            if not v.is_floating_point():
                continue
            x = v.detach().to(torch.float64)
            old = self.acc.get(k)
            self.acc[k] = b * x if old is None or a == 0.0 else a * old + b * x
        self.weight = a * self.weight + b

    def value(self, mask: Mapping[str, torch.Tensor] | None = None) -> Tensors:
        """The served model: acc / weight per float key (latest dtype), zero off ``mask``."""
        if not self.latest:
            raise RuntimeError("ModelAverage.value called before any update")
        out: Tensors = {}
        for k, v in self.latest.items():
            if k not in self.acc:
                out[k] = v
                continue
            avg = (self.acc[k] / self.weight).to(v.dtype)
            if mask is not None and k in mask:
                avg = torch.where(mask[k], avg, torch.zeros_like(avg))
            out[k] = avg
        return out


class AveragedStrategy(Strategy):
    """Any strategy, serving ``average``'s model; the inner strategy trains the iterate.

    ``mask_of()`` is the inner strategy's current consensus mask (None: dense). Rounds whose
    aggregation returned no arrays (rejected) leave both the iterate and the average as they
    were, as Flower's loop keeps its arrays.
    """

    def __init__(
        self,
        inner: Strategy,
        average: ModelAverage,
        mask_of: Callable[[], Mapping[str, torch.Tensor] | None] = lambda: None,
    ) -> None:
        self.inner, self.average, self.mask_of = inner, average, mask_of
        self.iterate: ArrayRecord | None = None  # what the clients train from next round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        start = arrays if self.iterate is None else self.iterate
        return self.inner.configure_train(server_round, start, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        if arrays is None:
            return None, metrics
        self.iterate = arrays
        state = dict(arrays.to_torch_state_dict())
        self.average.update(state, server_round)
        served = self.average.value(self.mask_of())
        return ArrayRecord({k: served[k] for k in state}), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()
