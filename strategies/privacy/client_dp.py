"""Client-level DP of sparse federated updates: clip each client's update, noise the PUBLIC mask.

DP-FedAvg (McMahan et al. 2018): each sampled client's update Delta_k = x_k - x (on the
coordinates it may change) is clipped to L2 norm C; the server releases
    x' = x + (sum_k clip_C(Delta_k) + N(0, (z C)^2)) / n
with n the number of clients SAMPLED this round (a fixed denominator: the sensitivity of the
sum is C whichever client is added or removed). Noise is added only on the public consensus
mask (and on dense tensors such as biases): entries off the mask stay exactly 0, so the model
stays sparse; noise there would densify it and be masked away anyway.

Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"): after each round C <- C * exp(-eta * (b~ - gamma)), where b~ is the noised fraction
of clients whose update norm was <= C (count noise std sigma_b), gamma the target quantile.
The values then use the multiplier of ``accountant.adaptive_value_noise`` so that the two
releases together cost one Gaussian of the configured multiplier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from strategies.privacy.accountant import PrivacyError

__all__ = ["AdaptiveClip", "clip_update", "update_norm", "private_sum_mean"]

State = Mapping[str, torch.Tensor]


def update_norm(delta: State) -> float:
    """Global L2 norm of an update over all its tensors."""
    return math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))


def clip_update(delta: State, clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """``delta * min(1, C / ||delta||)`` and the norm before clipping."""
    if not clip > 0:
        raise PrivacyError(f"clip norm must be > 0, got {clip}")
    norm = update_norm(delta)
    factor = min(1.0, clip / (norm + 1e-12))
    return {k: v * factor for k, v in delta.items()}, norm


def private_sum_mean(
    clipped: Sequence[State],
    shapes: Mapping[str, torch.Size],
    public_mask: Mapping[str, torch.Tensor],
    clip: float,
    noise_multiplier: float,
    sampled: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """(sum_k clipped_k + N(0, (z C)^2) on the public mask) / sampled."""
    if sampled < 1:
        raise PrivacyError(f"the number of sampled clients must be >= 1, got {sampled}")
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        total = torch.zeros(shape)
        for c in clipped:
            total += c[name].float()
        noise = torch.randn(shape, generator=generator) * (noise_multiplier * clip)
        if name in public_mask:
            noise = noise * public_mask[name].to(noise.dtype)
        out[name] = (total + noise) / sampled
    return out


@dataclass
class AdaptiveClip:
    """Geometric clip-norm update toward the ``quantile`` of client update norms."""

    clip: float
    quantile: float = 0.5  # gamma
    lr: float = 0.2  # eta
    count_noise: float = 0.0  # sigma_b (std of the noise on the unclipped count)

    def update(self, norms: Sequence[float], sampled: int, generator: torch.Generator) -> float:
        """New clip from this round's update norms (measured against the current clip)."""
        if sampled < 1:
            raise PrivacyError(f"the number of sampled clients must be >= 1, got {sampled}")
        unclipped = sum(1 for n in norms if n <= self.clip)
        noise = float(torch.randn((), generator=generator)) * self.count_noise
        return self.update_from_fraction((unclipped + noise) / sampled)

    def update_from_fraction(self, frac: float) -> float:
        """C <- C exp(-eta (b~ - gamma)) from the already noised unclipped fraction b~."""
        self.clip = self.clip * math.exp(-self.lr * (frac - self.quantile))
        return self.clip

    def state_dict(self) -> dict[str, float]:
        return {"clip": self.clip}

    def load_state_dict(self, d: Mapping[str, float]) -> None:
        self.clip = float(d["clip"])
