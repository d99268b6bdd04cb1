"""Mask-aware server optimizers on the rule API: FedAvgM, FedAdagrad, FedAdam, FedYogi, q-FedAvg.

Each follows Flower's own implementation (flwr.serverapp.strategy: fedavgm.py, fedopt.py,
fedadagrad.py, fedadam.py, fedyogi.py, qfedavg.py) and reproduces it with all-ones masks
(tests/strategies/aggregation/test_server_opt.py). Mask-awareness:

- the pseudo-gradient Δ = mean_i(values_i) - previous is taken with the mask-aware mean, so
  a coordinate's Δ comes only from the clients that keep it;
- a coordinate no client kept this round is left as it was (value and optimizer state);
- optimizer state of a coordinate off the consensus mask is reset to zero, so a weight that
  is regrown later starts with fresh moments (DESIGN: "optimizer state of a regrown weight
  is reset").

State (moments per key, float64) is saved in every checkpoint through ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from strategies.aggregation.merge import masked_weighted_mean, stack_kept
from strategies.aggregation.rules import MERGE_RULES, AggregationRule, RoundInput

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi", "QFedAvg", "ServerOptimizer"]

Tensors = dict[str, torch.Tensor]


class ServerOptimizer(AggregationRule):
    """Mask-aware mean, then `step` on the pseudo-gradient Δ per floating-point tensor."""

    slots: tuple[str, ...] = ()  # names of the per-key state tensors (moments)

    def __init__(self) -> None:
        self.state: dict[str, Tensors] = {s: {} for s in self.slots}

    def step(
        self, key: str, x: torch.Tensor, delta: torch.Tensor, server_round: int
    ) -> torch.Tensor:
        """New value of tensor ``key`` from ``x`` (previous, float64) and Δ (float64)."""
        raise NotImplementedError

    def aggregate(self, rnd: RoundInput) -> Tensors:
        mean = masked_weighted_mean(rnd.updates, rnd.previous)
        out: Tensors = {}
        for key, prev in rnd.previous.items():
            if not prev.is_floating_point():  # counters (BatchNorm's num_batches_tracked)
                out[key] = mean[key]
                continue
            _, keep, _ = stack_kept(rnd.updates, key)
            covered = keep.any(0)  # [*shape]: some client trained this coordinate
            x = prev.detach().to(torch.float64)
            old = {s: self._slot(s, key, x) for s in self.slots}
            new = self.step(key, x, mean[key].to(torch.float64) - x, rnd.server_round)
            on = rnd.mask.get(key, torch.ones_like(covered))
            for s in self.slots:  # untouched where uncovered; reset off the consensus mask
                kept = torch.where(covered, self.state[s][key], old[s])
                self.state[s][key] = torch.where(on, kept, torch.zeros_like(kept))
            out[key] = torch.where(covered, new, x).to(prev.dtype)
        return out

    def _slot(self, slot: str, key: str, like: torch.Tensor) -> torch.Tensor:
        t = self.state[slot].get(key)
        if t is None or t.shape != like.shape:
            t = torch.zeros_like(like)
        self.state[slot][key] = t
        return t

    def state_dict(self) -> dict[str, Any]:
        return {s: {k: v.clone() for k, v in d.items()} for s, d in self.state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = set(state) - set(self.slots)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown state slots {sorted(unknown)}")
        self.state = {s: {k: v.clone() for k, v in state.get(s, {}).items()} for s in self.slots}


@MERGE_RULES.register("fedavgm")
class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al. 2019): v = μ v + (x - mean); x' = x - lr v."""

    slots = ("momentum",)

    def __init__(self, server_learning_rate: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__()
        self.lr, self.mu = server_learning_rate, server_momentum

    def step(
        self, key: str, x: torch.Tensor, delta: torch.Tensor, server_round: int
    ) -> torch.Tensor:
        pg = -delta  # updates are the opposite of gradients
        if self.mu > 0.0:
            v = self.state["momentum"][key] = self.mu * self.state["momentum"][key] + pg
            pg = v
        return x - self.lr * pg


class _FedOpt(ServerOptimizer):
    """Adaptive federated optimization (Reddi et al. 2021): m = β1 m + (1-β1) Δ, then `second`."""

    slots = ("m", "v")

    def __init__(self, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        super().__init__()
        self.eta, self.beta_1, self.beta_2, self.tau = eta, beta_1, beta_2, tau

    def second(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eta_at(self, server_round: int) -> float:
        return self.eta

    def step(
        self, key: str, x: torch.Tensor, delta: torch.Tensor, server_round: int
    ) -> torch.Tensor:
        m = self.state["m"][key] = self.beta_1 * self.state["m"][key] + (1 - self.beta_1) * delta
        v = self.state["v"][key] = self.second(self.state["v"][key], delta**2)
        return x + self.eta_at(server_round) * m / (v.sqrt() + self.tau)


@MERGE_RULES.register("fedadagrad")
class FedAdagrad(_FedOpt):
    """FedAdagrad: v = v + Δ² (Flower fixes β1 = β2 = 0)."""

    def __init__(self, eta: float = 0.1, tau: float = 1e-3) -> None:
        super().__init__(eta, 0.0, 0.0, tau)

    def second(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2


@MERGE_RULES.register("fedadam")
class FedAdam(_FedOpt):
    """FedAdam: v = β2 v + (1-β2) Δ², bias-corrected step size as in Flower (round t: t+1)."""

    def __init__(
        self, eta: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(eta, beta_1, beta_2, tau)

    def second(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta_2 * v + (1 - self.beta_2) * d2

    def eta_at(self, server_round: int) -> float:
        t = server_round + 1.0
        return self.eta * math.sqrt(1 - self.beta_2**t) / (1 - self.beta_1**t)


@MERGE_RULES.register("fedyogi")
class FedYogi(_FedOpt):
    """FedYogi: v = v - (1-β2) Δ² sign(v - Δ²)."""

    def __init__(
        self, eta: float = 1e-2, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(eta, beta_1, beta_2, tau)

    def second(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.beta_2) * d2 * torch.sign(v - d2)


@MERGE_RULES.register("qfedavg")
class QFedAvg(AggregationRule):
    """q-FedAvg (Li et al. 2020, "Fair resource allocation"), stateless, mask-aware.

    Per client k with loss F_k and L = 1 / client_learning_rate:
    Δ_k = F_k^q · L (w - w_k) on the coordinates k keeps (0 elsewhere),
    h_k = q F_k^(q-1) L² ||w - w_k||² + L F_k^q;  w' = w - Σ Δ_k / Σ h_k.
    ``client_learning_rate`` defaults to the run's local.lr.
    """

    def __init__(
        self, client_learning_rate: float = 0.0, q: float = 0.1, train_loss_key: str = "train_loss"
    ) -> None:
        self.lr, self.q, self.loss_key = client_learning_rate, q, train_loss_key

    def aggregate(self, rnd: RoundInput) -> Tensors:
        if self.lr <= 0:
            raise ValueError("qfedavg needs aggregation.options.client-learning-rate > 0")
        lip = 1.0 / self.lr
        keys = [k for k, v in rnd.previous.items() if v.is_floating_point()]
        sum_delta = {k: torch.zeros_like(rnd.previous[k], dtype=torch.float64) for k in keys}
        sum_h = 0.0
        for u in rnd.updates:
            loss = u.metrics.get(self.loss_key)
            if not isinstance(loss, int | float) or not math.isfinite(loss) or loss < 0:
                raise ValueError(f"qfedavg: node {u.node_id} reported no valid {self.loss_key!r}")
            grads: Tensors = {}
            for k in keys:
                x = rnd.previous[k].to(torch.float64)
                keep = u.mask.get(k, torch.ones_like(x, dtype=torch.bool))
                grads[k] = torch.where(keep, lip * (x - u.values[k].to(torch.float64)), 0.0)
            norm = float(sum((g**2).sum() for g in grads.values()))
            lq = (loss + 1e-10) ** self.q
            for k in keys:
                sum_delta[k] += lq * grads[k]
            sum_h += self.q * (loss + 1e-10) ** (self.q - 1) * norm + lip * lq
        out = masked_weighted_mean(rnd.updates, rnd.previous)  # non-float keys
        for k in keys:
            x = rnd.previous[k].to(torch.float64)
            out[k] = (x - sum_delta[k] / sum_h).to(rnd.previous[k].dtype)
        return out
