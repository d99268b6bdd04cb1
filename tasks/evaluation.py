"""Held-out evaluation (loss, accuracy); in tasks/ so the server and the client share it."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy in [0, 1]) in eval mode; restores the training mode."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    if y.dim() != 1:
        raise ValueError(f"y must be 1-D class indices [N], got shape {tuple(y.shape)}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset (x has 0 examples)")
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            logits = model(xb)  # [b, classes]
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
    finally:
        model.train(was_training)
    return loss_sum / n, correct / n
