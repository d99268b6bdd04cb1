"""One client round of federated DST: train under the global mask, readjust it (FedDST), go on."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from client.dp_local import dp_train_steps
from client.trainer import TrainResult, evaluate, make_optimizer, train_steps
from strategies.plugins import option_kwargs
from strategies.sparse.engine import STRUCTURED_RULES, DSTConfig, DSTController
from strategies.sparse.masks import Mask
from strategies.sparse.rules import DST_RULES
from strategies.sparse.selection import parse_patterns
from tasks.config import LeanfedConfig


@dataclass
class RoundOutcome:
    """What a client reports after its local round."""

    loss: float
    num_examples: int
    steps: int
    regrew: bool
    dropped: int
    grown: int
    mask: Mask | None
    extra: dict[str, int | float] = field(default_factory=dict)  # e.g. continual metrics


def readjust_fraction(cfg: LeanfedConfig, server_round: int) -> float | None:
    """FedDST's cosine-decayed readjustment fraction for this round, or None.

    Bibikar et al. 2022 readjust client masks every ΔR rounds with
    α_r = α/2 · (1 + cos(π r / R_end)), stopping at R_end (RigL's schedule in rounds).
    """
    if cfg.dst_rule in ("dense", "static", "gmp"):  # set, rigl and plug-in rules readjust
        return None
    r_end = max(1, int(cfg.dst_end_round_fraction * cfg.num_server_rounds))
    if server_round >= r_end or server_round % cfg.dst_mask_round_interval != 0:
        return None
    return cfg.dst_drop_fraction / 2 * (1 + math.cos(math.pi * server_round / r_end))


def round_controller(
    model: nn.Module,
    cfg: LeanfedConfig,
    mask: Mask | None,
    generator: torch.Generator,
    condensed: bool = False,
) -> tuple[torch.optim.Optimizer, DSTController]:
    """A fresh local optimizer and a controller holding ``mask`` fixed for the round.

    Within a round the mask is fixed ("static"); topology changes happen once per
    readjustment round, as in FedDST, so the server sees one mask per client per round.
    A process that trains its one working model (``statics.work_model``) round after
    round gets the previous call's SGD optimizer, its state cleared, and controller,
    restarted: what a fresh build returns, without rebuilding what only the model's
    structure decides (measured ~0.1 ms of a 1.3 ms small-model client call).
    """
    reusable = (
        mask is not None
        and not condensed
        and cfg.dst_rule not in STRUCTURED_RULES
        and cfg.local_optimizer == "sgd"
    )
    if reusable:
        assert mask is not None
        params = tuple(p for p in model.parameters() if p.requires_grad)
        last = _LAST.get("last")
        if last is not None and last[0] is model and _same_run(last, cfg, params):
            optimizer, controller = last[3], last[4]
            optimizer.state.clear()  # a new optimizer's state: empty
            controller.restart(mask, generator)
            return optimizer, controller
    optimizer = make_optimizer(
        model, cfg.local_optimizer, cfg.local_lr, cfg.local_momentum, cfg.local_weight_decay
    )
    rule = "dense" if mask is None else "static"
    if mask is not None and cfg.dst_rule in STRUCTURED_RULES and not condensed:
        # The structured rule's drop/grow on readjustment; end_fraction 0 keeps the mask
        # fixed between them, as "static" does.
        rule = cfg.dst_rule
    dst = DSTConfig(
        rule=rule,
        density=cfg.dst_density,
        distribution=cfg.dst_distribution,
        end_fraction=0.0,
        exclude=parse_patterns(cfg.dst_exclude),  # the server's selection, so keys agree
    )
    # A condensed sub-network (client.condensed) holds exactly the masked keys it was sent;
    # its explicit-op encoder layers are not in the kernel selection, so select by name.
    keys = set(mask) if condensed and mask is not None else None
    controller = DSTController(
        model,
        optimizer,
        dst,
        total_steps=cfg.local_steps,
        mask=mask,
        generator=generator,
        predicate=None if keys is None else (lambda name, _t: name in keys),
    )
    if reusable:
        _LAST["last"] = (model, cfg, params, optimizer, controller)
    return optimizer, controller


# The last reusable (model, config, trainable parameters, optimizer, controller) of this
# process: one entry, so a process that builds fresh models keeps at most one alive.
_Entry = tuple[
    nn.Module, LeanfedConfig, tuple[nn.Parameter, ...], torch.optim.Optimizer, DSTController
]
_LAST: dict[str, _Entry] = {}


def _same_run(last: _Entry, cfg: LeanfedConfig, params: tuple[nn.Parameter, ...]) -> bool:
    same_params = len(last[2]) == len(params) and all(
        a is b for a, b in zip(last[2], params, strict=True)
    )
    return same_params and (last[1] is cfg or last[1] == cfg)


def local_round(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: LeanfedConfig,
    server_round: int,
    mask: Mask | None,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
    condensed: bool = False,
) -> RoundOutcome:
    """Train ``local.steps`` steps; on readjustment rounds prune+regrow halfway through.

    ``proximal_mu``: FedProx's client term, sent by the server as "proximal-mu" (as
    Flower's FedProx does), anchored at the received global model for both halves.

    Readjusting at the midpoint (not at the end) lets the regrown weights train before
    upload instead of being sent as zeros.
    """
    optimizer, controller = round_controller(model, cfg, mask, generator, condensed)
    # A condensed sub-network (client.condensed) cannot grow units it does not hold.
    fraction = None if condensed else readjust_fraction(cfg, server_round)
    first = cfg.local_steps if fraction is None else max(1, cfg.local_steps // 2)
    params = model.named_parameters()
    anchor = {k: v.detach().clone() for k, v in params} if proximal_mu else None
    batch = cfg.local_batch_size
    prox = (proximal_mu, anchor)
    private = cfg.privacy_mode == "record"

    def run(steps: int) -> TrainResult:
        if private:  # DP-SGD: clipped per-example gradients, noise on the kept weights
            return dp_train_steps(model, controller, x, y, steps, cfg, generator)
        return train_steps(model, controller, optimizer, x, y, steps, batch, generator, *prox)

    res = run(first)
    losses, steps = [res.loss * res.steps], res.steps
    dropped = grown = 0
    if fraction is not None and mask is not None:
        scores = None
        if cfg.dst_rule != "set" and not private:  # RigL or a plug-in; DP: grow at random
            n = min(len(x), 4 * cfg.local_batch_size)
            pick = torch.randperm(len(x), generator=generator)[:n]
            rule = DST_RULES.resolve(cfg.dst_rule)
            names = list(controller.mask)
            scores = rule(model, x[pick], y[pick], names, **option_kwargs(cfg.options("dst")))
        changed = controller.regrow(fraction, grow_scores=scores)
        dropped, grown = int(changed.get("dropped", 0)), int(changed.get("grown", 0))
        rest = cfg.local_steps - first
        if rest > 0:
            res = run(rest)
            losses.append(res.loss * res.steps)
            steps += res.steps
    return RoundOutcome(
        loss=sum(losses) / max(1, steps),
        num_examples=len(x),
        steps=steps,
        regrew=fraction is not None and mask is not None,
        dropped=dropped,
        grown=grown,
        mask=None if mask is None else {k: v.clone() for k, v in controller.mask.items()},
    )


def local_evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy in [0, 1]) of the received global model on this node's data."""
    return evaluate(model, x, y)
