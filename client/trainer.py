"""Local mini-batch trainer: plain SGD/Adam steps with the DST controller owning the update step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from tasks.evaluation import evaluate

if TYPE_CHECKING:  # only for annotations; the controller is passed in by the caller
    from strategies.sparse.engine import DSTController

__all__ = ["OPTIMIZERS", "TrainResult", "evaluate", "make_optimizer", "train_steps"]

OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


@dataclass
class TrainResult:
    """Summary of one ``train_steps`` call."""

    loss: float  # mean training loss over the steps taken
    num_examples: int  # size of the local training set
    steps: int
    dropped: int  # weights pruned by topology updates during these steps
    grown: int  # weights regrown by topology updates during these steps


def make_optimizer(
    model: nn.Module,
    name: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
) -> torch.optim.Optimizer:
    """SGD with momentum (the FedDST/RigL default), or Adam; ``momentum`` is ignored for Adam."""
    if lr <= 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    if y.dim() != 1:
        raise ValueError(f"y must be 1-D class indices [N], got shape {tuple(y.shape)}")


def train_steps(
    model: nn.Module,
    controller: DSTController | None,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch_size: int,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
    anchor: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Run ``steps`` cross-entropy mini-batch steps on (x [N, ...], y [N]).

    Batches are drawn without replacement from seeded permutations (epoch after epoch),
    so a run is reproducible from ``generator``. The controller sees every step:
    ``after_backward`` (RigL reads dense gradients, then masked gradients are zeroed)
    and ``step`` replaces ``optimizer.step`` (update, re-mask, prune/grow on schedule).
    ``controller=None`` trains densely with ``optimizer.step``.
    ``proximal_mu > 0`` adds FedProx's term (Li et al. 2020) mu/2 * sum ||w - w_start||^2
    around ``anchor`` (parameter name -> tensor; default: the weights at the start of this
    call); the reported loss stays the plain cross-entropy.
    """
    _check_xy(x, y)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    if n == 0 and steps > 0:
        raise ValueError("cannot train on an empty dataset (x has 0 examples)")
    model.train()
    pairs = (
        [
            (p, (anchor[n] if anchor is not None else p).detach().clone())
            for n, p in model.named_parameters()
            if p.requires_grad
        ]
        if proximal_mu > 0
        else []
    )
    bs = min(batch_size, n)
    total_loss, dropped, grown = 0.0, 0, 0
    perm = torch.randperm(n, generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor + bs > n:  # epoch boundary: fresh permutation, drop the ragged tail
            perm = torch.randperm(n, generator=generator)
            cursor = 0
        idx = perm[cursor : cursor + bs]  # [bs]
        cursor += bs
        _clear_grads(optimizer)
        logits = model(x[idx])  # [bs, classes]
        loss = F.cross_entropy(logits, y[idx])
        objective = loss
        if pairs:
            prox = sum(((p - p0) ** 2).sum() for p, p0 in pairs)
            objective = loss + 0.5 * proximal_mu * prox
        objective.backward()
        if controller is None:
            optimizer.step()
        else:
            controller.after_backward()
            changed = controller.step()
            dropped += int(changed.get("dropped", 0))
            grown += int(changed.get("grown", 0))
        total_loss += float(loss.detach())
    return TrainResult(
        loss=total_loss / steps if steps else 0.0,
        num_examples=n,
        steps=steps,
        dropped=dropped,
        grown=grown,
    )


def _clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``: torch's own loop runs under a profiler
    scope and a dynamo guard that cost more than the loop on a small model."""
    if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
        optimizer.zero_grad(set_to_none=True)  # an optimizer with its own zero_grad
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
