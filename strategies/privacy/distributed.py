"""Distributed client-level DP: each client clips, noises its share and quantizes for SecAgg+.

DP-FedAvg (McMahan et al. 2018) without a trusted server. The released sum must carry
N(0, (z C)^2) per coordinate, as server-side DP (`client_dp.private_sum_mean`) adds it; here
no single party adds it. Each sampled client k

  1. takes its update Delta_k = x_k - g on the PUBLIC consensus mask M (times its own mask
     m_k; dense tensors everywhere) and clips it to L2 norm C over all tensors;
  2. adds its share of noise e_k ~ N(0, sigma_c^2) on every coordinate of M, with
         sigma_c = z_d C / sqrt(n_min),
     n_min = the fewest survivors the round accepts, floor(f |U1|) + 1 for the share
     threshold fraction f and the |U1| clients that shared keys: the Shamir threshold of the
     complete graph; with a SecAgg+ sparse graph the group thresholds are lower, and the
     strategy enforces n_min for the round itself (fewer survivors: the round aborts, as
     it could only release too little noise). The s >= n_min survivors' noise sums to
     N(0, (s / n_min) (z_d C)^2): at least the (z_d C)^2 the accountant assumes. Dropouts
     below the sampled count make the noise LARGER (s/n_min up to n/n_min), never smaller;
     the accountant uses z as if exactly n_min survived (the conservative value). The noise
     is not fresh per server: it comes from OS entropy, never from the run seed, which the
     server knows and could replay;
  3. quantizes Delta_k + e_k with the range c_q = C + K_SIGMA sigma_c, AFTER the noise
         z_k = round(s (Delta_k + e_k)),   s = (2^(q-1) - 1) / c_q,
     WITHOUT clamping (clamping a noisy value would change the noise's law): a coordinate
     beyond c_q simply wraps in its own two's-complement word, and the ring has one spare
     bit, so the SUM decodes exactly unless |sum_k e_k| > (K_SIGMA + 2) n sigma_c, i.e.
     beyond ~10 sqrt(n) standard deviations of the summed noise.
  4. (adaptive clipping, Andrew et al. 2021) adds b_k = 1[||Delta_k|| <= C] plus its share of
     the count noise N(0, sigma_b^2 / n_min), quantized with 2^COUNT_BITS levels per unit,
     as one more coordinate of the secure sum.

The server decodes  g' = g + (sum_k z_k) / (s n)  on M (n = clients SAMPLED this round, the
fixed DP-FedAvg denominator), and the noised unclipped count for the clip update. Added
quantization error: each client's rounding is at most 1 / (2 s) per coordinate, so the mean
errs by at most (s_count / n) / (2 s) <= c_q / (2 (2^(q-1) - 1)) (`DPSumPlan.error_bound`),
on top of the noise. The accountant's epsilon is that of the continuous Gaussian sum; the
rounding of each noisy value to a grid of step 1/s is not modelled (Kairouz et al. 2021,
"The distributed discrete Gaussian mechanism", treat it exactly with integer noise).
Against colluding clients the guarantee is weaker: they can subtract their own noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from strategies.privacy.accountant import PrivacyError
from strategies.secure.crypto import SecAggError
from strategies.secure.protocol import threshold_for
from strategies.secure.ring import Layout, Segment, bits_for, signed, to_ring
from strategies.secure.sparse_sum import SecureSum, check_mask_shapes, on_mask_indices

__all__ = ["COUNT_BITS", "K_SIGMA", "DPSumPlan", "client_noise_std", "min_survivors"]

K_SIGMA = 4.0  # quantization range: the clip plus K_SIGMA client noise stds
COUNT_BITS = 16  # fixed-point bits of the noised unclipped indicator


def min_survivors(key_sharers: int, threshold_fraction: float) -> int:
    """n_min = floor(f |U1|) + 1: the fewest survivors a distributed-DP round accepts."""
    if key_sharers < 1:
        raise SecAggError("no client shared keys: the round has no survivors to count")
    return threshold_for(key_sharers, threshold_fraction)


def client_noise_std(noise_multiplier: float, clip: float, n_min: int) -> float:
    """sigma_c = z C / sqrt(n_min): n_min such shares sum to the std z C of one server draw."""
    if noise_multiplier < 0 or clip <= 0 or n_min < 1:
        raise PrivacyError(
            f"need noise >= 0, clip > 0, n_min >= 1; got {noise_multiplier}, {clip}, {n_min}"
        )
    return noise_multiplier * clip / math.sqrt(n_min)


@dataclass(frozen=True)
class DPSumPlan:
    """The public plan of one distributed-DP secure round (same interface as SparseSumPlan)."""

    shapes: dict[str, tuple[int, ...]]  # every floating-point entry of the model
    mask: dict[str, torch.Tensor]  # the public consensus mask M (keys absent: dense)
    clip: float  # C, the L2 clip of one client's update
    noise_std: float  # sigma_c, each client's noise std per coordinate (value units)
    count_noise_std: float  # each client's noise std on its unclipped indicator (0: none)
    quant_bits: int
    num_clients: int  # clients that may contribute (|U1|): sizes the ring
    sampled: int  # the DP-FedAvg denominator n (clients sampled this round)
    full: bool = False  # the public mask is fixed under client-level DP: never a vote round

    def __post_init__(self) -> None:
        if self.clip <= 0 or self.noise_std < 0 or self.count_noise_std < 0:
            raise SecAggError("need clip > 0 and noise stds >= 0")
        if not 2 <= self.quant_bits <= 32 or self.num_clients < 1 or self.sampled < 1:
            raise SecAggError("need 2 <= quant bits <= 32 and client counts >= 1")
        check_mask_shapes(self.mask, self.shapes)

    @property
    def keys(self) -> list[str]:
        return sorted(self.shapes)

    @property
    def quant_range(self) -> float:
        """c_q = C + K_SIGMA sigma_c: the range the 2^(q-1) - 1 levels per side cover."""
        return self.clip + K_SIGMA * self.noise_std

    @property
    def scale(self) -> float:
        return (2 ** (self.quant_bits - 1) - 1) / self.quant_range

    def error_bound(self) -> float:
        """Max |quantization error| of the decoded mean per coordinate (survivors <= sampled)."""
        return 1.0 / (2.0 * self.scale)

    def _on_mask(self, key: str) -> np.ndarray:
        return on_mask_indices(self.mask, self.shapes, key)

    def layout(self) -> Layout:
        n, qmax = self.num_clients, 2 ** (self.quant_bits - 1) - 1
        on_mask = sum(len(self._on_mask(k)) for k in self.keys)
        # one spare bit: the sum of n noisy values stays within 2 n qmax (module docstring)
        values = Segment("values", on_mask, bits_for(2 * n * qmax, signed_values=True))
        return Layout((values, Segment("stats", 2, 62)))  # stats: [count, noised indicator]

    # ------------------------------------------------------------------ client side
    def encode(
        self,
        received: dict[str, torch.Tensor],
        local: dict[str, torch.Tensor],
        local_mask: dict[str, torch.Tensor] | None,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, float]:
        """(one client's clipped, noised, quantized vector in layout order, its update norm)."""
        parts = []
        for k in self.keys:
            idx = self._on_mask(k)
            delta = (local[k].detach().double() - received[k].detach().double()).reshape(-1)
            d = delta.numpy()[idx]
            if local_mask is not None and k in local_mask:  # only what the client may change
                d = d * local_mask[k].reshape(-1).numpy()[idx]
            parts.append(d)
        delta_m = np.concatenate(parts) if parts else np.zeros(0)
        if not np.all(np.isfinite(delta_m)):
            raise SecAggError("cannot encode a non-finite update")
        norm = float(np.linalg.norm(delta_m))
        clipped = delta_m * min(1.0, self.clip / (norm + 1e-12))
        noisy = clipped + rng.normal(0.0, 1.0, clipped.shape) * self.noise_std  # noise on M only
        z = np.rint(noisy * self.scale).astype(np.int64)  # no clamp: see the docstring
        indicator = 0.0  # without count noise the indicator is not released at all
        if self.count_noise_std > 0:
            indicator = float(norm <= self.clip) + float(rng.normal()) * self.count_noise_std
        stats = np.array([1, round(indicator * 2**COUNT_BITS)], dtype=np.int64)
        return np.concatenate([to_ring(z), to_ring(stats)]), norm

    # ------------------------------------------------------------------ server side
    def decode(self, total: np.ndarray, previous: dict[str, torch.Tensor]) -> SecureSum:
        """g + sum / (s n) on M; coordinates off M keep g (the strategy zeroes them)."""
        layout = self.layout()
        segs = layout.split(total)
        bits = {s.name: s.bits for s in layout.segments}
        values = signed(segs["values"], bits["values"]).astype(np.float64)
        stats = signed(segs["stats"], 62)
        merged: dict[str, torch.Tensor] = {}
        at = 0
        for k in self.keys:
            idx = self._on_mask(k)
            flat = previous[k].detach().double().reshape(-1).clone()
            mean = values[at : at + len(idx)] / (self.scale * self.sampled)
            flat[idx] = flat[idx] + torch.from_numpy(mean)
            merged[k] = flat.reshape(self.shapes[k]).to(previous[k].dtype)
            at += len(idx)
        count = int(stats[0])
        unclipped = float(stats[1]) / 2**COUNT_BITS
        return SecureSum(merged, {}, count, 0.0, 0, noised_unclipped=unclipped)
