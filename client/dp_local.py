"""Record-level DP on a site: DP-SGD steps under the DST mask, and the site's own epsilon.

Each step draws a Poisson sample of the site's examples (rate q = batch / N), privatizes the
per-example gradients (``strategies.privacy.dp_sgd``: clip to C, Gaussian noise on the kept
weights only) and hands them to the DST controller, which zeroes masked gradients and steps
the optimizer. The epsilon(delta) of the site is accounted over every round it has trained
in the run (its count lives in ``context.state``), with the RDP accountant, through
`SiteAccounting`: the same function the server recomputes it with from the reported
example count and round count (`strategies.aggregation.site_epsilon`).
What a DP site releases: its weights and mask (post-processing of DP-SGD) and its example
count (public in DP-SGD's accounting); its training loss is withheld (reported as 0).
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, RecordDict

from client.trainer import TrainResult
from strategies.privacy.accountant import PrivacyError, SiteAccounting
from strategies.privacy.dp_sgd import per_example_grads, poisson_batch, privatize
from strategies.sparse.engine import DSTController
from tasks.config import LeanfedConfig

__all__ = ["DP_STATE_KEY", "account_site", "dp_train_steps"]

DP_STATE_KEY = "leanfed.dp"  # ConfigRecord in context.state: DP-SGD steps taken so far


def dp_train_steps(
    model: torch.nn.Module,
    controller: DSTController,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    cfg: LeanfedConfig,
    generator: torch.Generator,
) -> TrainResult:
    """``steps`` DP-SGD steps (Abadi et al. 2016) on (x [N, ...], y [N]) under the mask."""
    n = int(x.shape[0])
    model.train()
    shapes = {k: p.shape for k, p in model.named_parameters() if p.requires_grad}
    params = dict(model.named_parameters())
    dropped = grown = 0
    for _ in range(steps):
        idx = poisson_batch(n, cfg.local_batch_size, generator)  # [B], B ~ Bin(N, q)
        per_ex = per_example_grads(model, x[idx], y[idx]) if idx.numel() else {}
        grads = privatize(
            per_ex,
            shapes,
            controller.mask,
            cfg.privacy_clip,
            cfg.privacy_noise_multiplier,
            min(cfg.local_batch_size, n),
            generator,
        )
        controller.optimizer.zero_grad(set_to_none=True)
        for k, g in grads.items():
            params[k].grad = g
        controller.after_backward()
        changed = controller.step()
        dropped += int(changed.get("dropped", 0))
        grown += int(changed.get("grown", 0))
    return TrainResult(loss=0.0, num_examples=n, steps=steps, dropped=dropped, grown=grown)


def account_site(
    state: RecordDict, cfg: LeanfedConfig, steps: int, num_examples: int
) -> tuple[float, int]:
    """Count this round in the site's state; return (its epsilon(delta) so far, its rounds).

    ``steps``: the DP-SGD steps this round took; the accounting (and the server's check)
    assumes ``local.steps`` a round, so any other count is refused rather than under-counted.
    """
    accounting = SiteAccounting.of(cfg)
    if steps != accounting.local_steps:
        raise PrivacyError(
            f"a DP round took {steps} steps, the accounting assumes {cfg.local_steps}"
        )
    rec = state.config_records.get(DP_STATE_KEY)
    rounds = int(rec.get("rounds", 0)) if rec is not None else 0  # type: ignore[arg-type]
    rounds += 1
    state.config_records[DP_STATE_KEY] = ConfigRecord(
        {"steps": rounds * accounting.local_steps, "rounds": rounds}
    )
    return accounting.site_epsilon(num_examples, rounds), rounds
