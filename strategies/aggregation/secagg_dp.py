"""SecAggDPSparseFedAvg: client-level DP, noise added by the clients, summed by SecAgg+.

DP-FedAvg (McMahan et al. 2018) as `dp.DPSparseFedAvg` releases it, but every sampled client
clips its own update, adds its share of the Gaussian noise on the public consensus mask and
quantizes (`strategies.privacy.distributed`), and the server only ever unmasks the SUM
(`secagg.SecAggSparseFedAvg`). Per round the train record tells each client the public plan:
the clip C (adaptive: Andrew et al. 2021, updated from the securely summed, noised unclipped
count), n_min = floor(f |U1|) + 1 (the fewest survivors the round accepts), the sampled
count n and the count-noise std sigma_b. Each client computes n_min and its noise std
z_d C / sqrt(n_min) itself, from the noise multiplier and threshold of ITS OWN run config,
and refuses a plan whose n_min differs (so a server cannot talk the noise down). A round
with fewer than n_min survivors aborts (it could only complete with too little noise).

epsilon(delta) per released round from the RDP accountant, q = n / all clients, exactly as
server-side client-level DP; a round that aborts releases nothing and is not accounted.
The public mask is fixed (no private vote), as in `dp.DPSparseFedAvg`.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from strategies.aggregation.dp_state import DPStateMixin
from strategies.aggregation.secagg import SecAggSparseFedAvg
from strategies.aggregation.secagg_round import Round, RoundAborted, SumPlan
from strategies.privacy.accountant import adaptive_value_noise, epsilon
from strategies.privacy.client_dp import AdaptiveClip
from strategies.privacy.distributed import DPSumPlan, client_noise_std, min_survivors

__all__ = ["SecAggDPSparseFedAvg", "count_noise_for"]


def count_noise_for(sampled: int, noise_multiplier: float) -> float:
    """sigma_b = max(n / 20, z): Andrew et al.'s n/20, but never below z (see `dp.py`)."""
    return max(max(1, sampled) / 20, noise_multiplier)


class SecAggDPSparseFedAvg(DPStateMixin, SecAggSparseFedAvg):
    """SecAgg+ rounds whose secure sum is the distributed-DP clipped, noised update sum."""

    DP_CLIP_ATTR = "dp_clip"  # ``clip`` is the secure sum's quantization clip here

    def __init__(  # noqa: PLR0913 - the knobs are the run config
        self,
        *,
        noise_multiplier: float,
        dp_clip: float,
        delta: float,
        num_clients: int,
        adaptive_clip: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        **kwargs: object,
    ) -> None:
        kwargs["mask_update_end_round"] = 0  # the public mask is fixed: see the docstring
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.noise_multiplier, self.delta, self.num_clients = noise_multiplier, delta, num_clients
        self.dp_clip = dp_clip
        self.clipper = AdaptiveClip(dp_clip, target_quantile, clip_lr) if adaptive_clip else None
        self.dp_rounds = 0
        self.merge_rule_name = f"secagg+dp-fedavg(z={noise_multiplier}, C={dp_clip})"

    # -- the plan each client follows ---------------------------------------------------------

    def _plan(self, rs: Round, floats: dict[str, tuple[int, ...]], sampled: int) -> SumPlan:
        assert self.mask is not None
        fields = self._plan_fields(rs, sampled)
        n_min, count_noise = int(fields["dp-min-survivors"]), float(fields["dp-count-noise"])
        z_d = (
            adaptive_value_noise(self.noise_multiplier, count_noise)
            if self.clipper is not None
            else self.noise_multiplier
        )
        return DPSumPlan(
            floats,
            {k: m for k, m in self.mask.items() if k in floats},
            clip=self.dp_clip,
            noise_std=client_noise_std(z_d, self.dp_clip, n_min),
            count_noise_std=count_noise / n_min**0.5 if self.clipper is not None else 0.0,
            quant_bits=self.quant_bits,
            num_clients=len(rs.u1),
            sampled=sampled,
        )

    def _plan_fields(self, rs: Round, sampled: int) -> dict[str, int | float]:
        return {
            "dp-clip": float(self.dp_clip),
            "dp-min-survivors": min_survivors(len(rs.u1), self.threshold),
            "dp-sampled": sampled,
            "dp-count-noise": (
                count_noise_for(sampled, self.noise_multiplier) if self.clipper else 0.0
            ),
        }

    def _unmask(self, rs: Round, masked: dict[int, np.ndarray]) -> np.ndarray:
        n_min = min_survivors(len(rs.u1), self.threshold)
        if len(masked) < n_min:  # the noise depends on it (SecAgg+ graphs allow fewer)
            raise RoundAborted(
                f"{len(masked)} survivors, the DP noise needs at least {n_min} (n_min)"
            )
        return super()._unmask(rs, masked)

    # -- aggregation and accounting -------------------------------------------------------------

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """SecAgg+'s round, then the clip update and this round's epsilon(delta)."""
        self.last_secure_sum = None
        plan = self._round.plan if self._round is not None else None
        arrays, metrics = super().aggregate_train(server_round, replies)
        metrics = metrics if metrics is not None else MetricRecord()
        result = self.last_secure_sum
        if arrays is not None and result is not None and isinstance(plan, DPSumPlan):
            self.dp_rounds += 1
            if self.clipper is not None and result.noised_unclipped is not None:
                frac = result.noised_unclipped / plan.sampled
                self.dp_clip = self.clipper.update_from_fraction(frac)
            metrics["dp_quant_error_bound"] = plan.error_bound()
        sampled = plan.sampled if isinstance(plan, DPSumPlan) else 1
        q = min(1.0, max(1, sampled) / max(1, self.num_clients))
        metrics["dp_epsilon"] = (
            epsilon(self.noise_multiplier, q, self.dp_rounds, self.delta) if self.dp_rounds else 0.0
        )
        metrics["dp_delta"] = float(self.delta)
        metrics["dp_clip"] = float(self.dp_clip)
        self.last_train_metrics = metrics
        return arrays, metrics
