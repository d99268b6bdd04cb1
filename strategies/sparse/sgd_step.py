"""``torch.optim.SGD.step()`` for the plain CPU case, without its per-call wrapping.

A client of a small model takes a few steps per round, and ``SGD.step`` spends more time
in its wrapping (profiler scope, step hooks, grad-mode and dynamo guards, the
foreach/fused dispatch) than in the arithmetic. ``sgd_step`` runs the same tensor ops,
in the same order, as torch's ``_single_tensor_sgd`` (what ``step`` picks for CPU
tensors), so the parameters and momentum buffers come out bit for bit the same, and it
declines (returns False) for anything else: other optimizer types, step hooks, foreach,
fused, differentiable, maximize or Nesterov groups, tensor hyperparameters, a gradient
scaler's attributes, sparse or non-CPU tensors.
"""

from __future__ import annotations

import torch
from torch.optim import optimizer as optim_module


def _plain(opt: torch.optim.Optimizer) -> bool:
    if type(opt) is not torch.optim.SGD or opt.defaults.get("differentiable"):
        return False
    if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks:
        return False
    if optim_module._global_optimizer_pre_hooks or optim_module._global_optimizer_post_hooks:
        return False
    if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
        return False
    for group in opt.param_groups:
        if group["foreach"] or group["fused"] or group["maximize"] or group["nesterov"]:
            return False
        if group["differentiable"]:
            return False
        if any(isinstance(group[k], torch.Tensor) for k in ("lr", "weight_decay", "momentum")):
            return False
        for p in group["params"]:
            g = p.grad
            if p.device.type != "cpu" or (g is not None and (g.is_sparse or g.device != p.device)):
                return False
    return True


def sgd_step(opt: torch.optim.Optimizer) -> bool:
    """One ``opt.step()`` if ``opt`` is a plain CPU SGD (see the module docstring); returns
    whether it stepped (False: nothing was touched, call ``opt.step()``)."""
    if not _plain(opt):
        return False
    with torch.no_grad():
        for group in opt.param_groups:
            wd, momentum = group["weight_decay"], group["momentum"]
            lr, dampening = group["lr"], group["dampening"]
            # As SGD._init_group: the buffers are read before any is made (a parameter
            # listed twice gets two fresh buffers, as in torch) and stored after.
            params = [p for p in group["params"] if p.grad is not None]
            bufs = [opt.state[p].get("momentum_buffer") for p in params] if momentum else []
            for i, p in enumerate(params):
                grad = p.grad
                if wd != 0:
                    grad = grad.add(p, alpha=wd)
                if momentum != 0:
                    buf = bufs[i]
                    if buf is None:
                        buf = bufs[i] = grad.detach().clone()
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                    grad = buf
                p.add_(grad, alpha=-lr)
            for p, buf in zip(params, bufs, strict=False):
                opt.state[p]["momentum_buffer"] = buf
    return True
