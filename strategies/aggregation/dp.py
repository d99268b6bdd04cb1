"""DPSparseFedAvg: SparseFedAvg with differential privacy, record-level or client-level.

- ``mode = "record"``: clients run DP-SGD (``strategies.privacy.dp_sgd``) and report their own
  epsilon(delta) as the ``dp_epsilon`` metric with the rounds they trained (``dp_rounds``);
  the server recomputes it from public data (`site_epsilon.SiteEpsilonCheck`) and rejects a
  reply whose epsilon is not the accountant's; the round records the LARGEST site epsilon
  of its accepted replies. (Under SecAgg+: `secagg_record.SecAggRecordDPSparseFedAvg`.)
- ``mode = "client"``: DP-FedAvg (McMahan et al. 2018) on the server, with the maths in
  ``strategies.privacy.client_dp``: each update is clipped to C, the clipped updates are
  averaged over the SAMPLED clients and Gaussian noise N(0, (z C)^2)/n is added on the public
  consensus mask only; fixed or adaptive C (Andrew et al. 2021). The consensus mask is not
  re-voted (client masks are not privatized): it stays the seeded initial mask, which depends
  on no data. epsilon(delta) per round from the RDP accountant, q = sampled / all clients.

Only the merge rule and ``aggregate_train`` are wrapped; Flower's ``start`` loop runs as is.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from strategies.aggregation.dp_state import DPStateMixin
from strategies.aggregation.merge import ClientUpdate
from strategies.aggregation.metric_rules import EPSILON_KEY
from strategies.aggregation.rules import FunctionRule
from strategies.aggregation.site_epsilon import SiteEpsilonCheck
from strategies.aggregation.strategy import SparseFedAvg
from strategies.privacy.accountant import SiteAccounting, adaptive_value_noise, epsilon
from strategies.privacy.client_dp import AdaptiveClip, clip_update, private_sum_mean

__all__ = ["DPSparseFedAvg"]


class DPSparseFedAvg(DPStateMixin, SparseFedAvg):
    """SparseFedAvg whose rounds are differentially private (see the module docstring)."""

    def __init__(  # noqa: PLR0913 - the knobs are the run config
        self,
        *,
        privacy_mode: str,
        noise_multiplier: float,
        clip: float,
        delta: float,
        num_clients: int,
        adaptive_clip: bool = False,
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        accounting: SiteAccounting | None = None,
        **kwargs: object,
    ) -> None:
        if privacy_mode not in ("record", "client"):
            raise ValueError(f"privacy_mode must be 'record' or 'client', got {privacy_mode!r}")
        if privacy_mode == "record" and accounting is None:
            raise ValueError("record-level DP needs the sites' accounting (SiteAccounting)")
        if privacy_mode == "client":
            kwargs["mask_update_end_round"] = 0  # the public mask is fixed: see the docstring
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.privacy_mode = privacy_mode
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.num_clients = num_clients
        self.dp_rounds = 0
        self.clipper = AdaptiveClip(clip, target_quantile, clip_lr) if adaptive_clip else None
        self.clip = clip
        self._sampled = 0
        self._round = 0
        # record-level: each site's reported epsilon is recomputed (None: client-level)
        self.site_check = SiteEpsilonCheck(accounting) if accounting is not None else None
        if privacy_mode == "client":
            self.merge_rule_name = f"dp-fedavg(z={noise_multiplier}, C={clip})"
            self.rule = FunctionRule(self._dp_merge, label=self.merge_rule_name)

    def _metrics_problem(
        self, server_round: int, node: int, metrics: dict[str, int | float]
    ) -> str | None:
        """Record-level: why a site's reported epsilon is refused (recomputed), or None."""
        if self.privacy_mode != "record" or self.site_check is None:
            return None
        return self.site_check.admit(node, server_round, metrics)

    # -- the private merge -------------------------------------------------------------------

    def _value_noise(self) -> float:
        if self.clipper is None:
            return self.noise_multiplier
        return adaptive_value_noise(self.noise_multiplier, self.clipper.count_noise)

    def _dp_merge(
        self, updates: list[ClientUpdate], previous: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        assert self.mask is not None
        public = self.mask
        clipped, norms = [], []
        for u in updates:
            delta = {}
            for k, prev in previous.items():
                d = u.values[k].float() - prev.float()
                if k in public:  # only the public mask's coordinates (and the client's own)
                    keep = public[k] & u.mask.get(k, torch.ones_like(public[k]))
                    d = torch.where(keep, d, torch.zeros_like(d))
                delta[k] = d
            c, norm = clip_update(delta, self.clip)
            clipped.append(c)
            norms.append(norm)
        # Per-round noise stream from (seed, round): reproducible and resumable without state.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._round)
        shapes = {k: v.shape for k, v in previous.items()}
        sampled = max(self._sampled, len(updates))
        mean = private_sum_mean(
            clipped, shapes, public, self.clip, self._value_noise(), sampled, gen
        )
        if self.clipper is not None:
            self.clip = self.clipper.update(norms, sampled, gen)
        return {k: (previous[k].float() + mean[k]).to(previous[k].dtype) for k in previous}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """SparseFedAvg's round, then this round's epsilon(delta) in the metrics."""
        replies = list(replies)
        self._round = server_round
        self._sampled = len(self._sent["train"])
        if self.privacy_mode == "client" and self.clipper is not None:
            # Andrew et al. suggest sigma_b = n / 20; with few clients that is below z / 2,
            # where the count would eat the whole budget, so it is at least z (values then
            # get z_d = 1.15 z).
            self.clipper.count_noise = max(max(1, self._sampled) / 20, self.noise_multiplier)
        arrays, metrics = super().aggregate_train(server_round, replies)
        metrics = metrics if metrics is not None else MetricRecord()
        if self.privacy_mode == "client":
            self.dp_rounds += 1
            q = min(1.0, max(1, self._sampled) / max(1, self.num_clients))
            metrics["dp_epsilon"] = epsilon(self.noise_multiplier, q, self.dp_rounds, self.delta)
            metrics["dp_clip"] = float(self.clip)
        else:
            # the worst (largest) site epsilon among the replies the validator accepted
            # (`metric_rules.EPSILON_RULE`: finite, in [0, MAX_EPSILON]; a bad one rejects
            # its reply)
            eps = [
                float(v.metrics[EPSILON_KEY])
                for v in self.last_verdicts.get("train", [])
                if v.accepted and EPSILON_KEY in v.metrics
            ]
            if eps:
                metrics[EPSILON_KEY] = max(eps)
        metrics["dp_delta"] = float(self.delta)
        self.last_train_metrics = metrics
        return arrays, metrics
