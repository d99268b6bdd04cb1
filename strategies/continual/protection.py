"""Protect weights important to earlier experiences: freeze masks (PackNet/NISPA), EWC penalty.

Three tools, usable alone or together, all keyed by ``model.state_dict()`` names like masks:

1. Freeze (PackNet, Mallya & Lazebnik 2018; NISPA, Gurbuz & Dovrolis 2022): after each
   experience the top-importance *active* weights not yet frozen are frozen. A frozen
   weight is never dropped by DST (``forbidden_drop`` / ``protect_drop_scores``), gets no
   gradient (``zero_frozen_grads``) and is restored after the optimizer step
   (``restore_frozen``: weight decay and momentum would otherwise still move it).
2. Importance: magnitude |w| (PackNet) or accumulated |w * dL/dw| (first-order Taylor
   saliency, Molchanov et al. 2017) or accumulated g^2 (empirical Fisher diagonal, EWC).
3. EWC penalty (Kirkpatrick et al. 2017): lambda/2 * sum_i F_i (theta_i - theta*_i)^2
   with F the importance at consolidation and theta* the weights then.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Mask = dict[str, torch.Tensor]  # bool tensors keyed by state_dict names (strategies.sparse.masks)
IMPORTANCE_KINDS = ("taylor", "fisher")


class ImportanceAccumulator:
    """Accumulates per-weight importance over the backward passes of one experience."""

    def __init__(self, names: list[str], kind: str = "taylor") -> None:
        if kind not in IMPORTANCE_KINDS:
            raise ValueError(f"importance kind must be one of {IMPORTANCE_KINDS}, got {kind!r}")
        self.names = list(names)
        self.kind = kind
        self.totals: dict[str, torch.Tensor] = {}
        self.count = 0

    def accumulate(self, model: nn.Module) -> None:
        """Call after ``loss.backward()``: adds |w*g| (taylor) or g^2 (fisher) per weight."""
        params = dict(model.named_parameters())
        for n in self.names:
            if n not in params:
                raise KeyError(f"importance name {n!r} is not a parameter of the model")
            p = params[n]
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            term = (p.detach().float() * g).abs() if self.kind == "taylor" else g * g
            self.totals[n] = self.totals[n] + term if n in self.totals else term.clone()
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        """Average importance per backward pass ({name: float tensor})."""
        if self.count == 0:
            raise ValueError("no backward pass accumulated yet")
        return {n: t / self.count for n, t in self.totals.items()}


class ProtectionMask:
    """Frozen-weight mask + (optional) EWC importance and anchor weights."""

    def __init__(self, shapes: dict[str, torch.Size]) -> None:
        self.frozen: Mask = {n: torch.zeros(s, dtype=torch.bool) for n, s in shapes.items()}
        self.importance: dict[str, torch.Tensor] = {}  # F_i, accumulated over experiences
        self.anchor: dict[str, torch.Tensor] = {}  # theta*_i at the last consolidation
        self.experiences = 0

    @classmethod
    def for_mask(cls, mask: Mask) -> ProtectionMask:
        """An empty protection with the same keys/shapes as a DST mask."""
        return cls({n: m.shape for n, m in mask.items()})

    def frozen_count(self) -> int:
        return int(sum(int(f.sum()) for f in self.frozen.values()))

    def consolidate(
        self,
        weights: dict[str, torch.Tensor],
        mask: Mask,
        fraction: float,
        scores: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, int]:
        """Freeze, per tensor, the top ``fraction`` of active, not-yet-frozen weights.

        ``scores`` default to |w| (PackNet's magnitude criterion); pass
        ``ImportanceAccumulator.mean()`` for Taylor/Fisher importance. Per tensor
        k = round(fraction * #(mask & ~frozen)) entries with the highest score are frozen
        (ties broken by index order via a stable sort). Also stores the weights as the
        EWC anchor and adds ``scores`` to the EWC importance.
        Returns {name: newly frozen count}.
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"freeze fraction must be in [0, 1], got {fraction}")
        self._check_keys(mask, "mask")
        newly: dict[str, int] = {}
        for n, frozen in self.frozen.items():
            if n not in weights:
                raise KeyError(f"weights lack protected tensor {n!r}")
            w = weights[n].detach()
            if w.shape != frozen.shape:
                raise ValueError(
                    f"weight {n!r} has shape {tuple(w.shape)}, "
                    f"protection expects {tuple(frozen.shape)}"
                )
            score = (scores[n] if scores is not None and n in scores else w.abs()).float()
            candidates = mask[n].bool() & ~frozen
            k = round(fraction * int(candidates.sum()))
            if k > 0:
                flat = torch.where(candidates, score, torch.tensor(float("-inf"))).flatten()
                order = torch.sort(flat, descending=True, stable=True).indices[:k]
                new = torch.zeros_like(flat, dtype=torch.bool)
                new[order] = True
                self.frozen[n] = frozen | new.view_as(frozen)
            newly[n] = k
            self.anchor[n] = w.float().clone()
            if scores is not None and n in scores:
                prev = self.importance.get(n)
                s = scores[n].detach().float()
                self.importance[n] = s.clone() if prev is None else prev + s
        self.experiences += 1
        return newly

    def _check_keys(self, other: dict[str, torch.Tensor], what: str) -> None:
        missing = sorted(set(self.frozen) - set(other))
        if missing:
            raise KeyError(f"{what} lacks protected tensors {missing}")
        for n, f in self.frozen.items():
            if other[n].shape != f.shape:
                raise ValueError(
                    f"{what}[{n!r}] has shape {tuple(other[n].shape)}, "
                    f"protection expects {tuple(f.shape)}"
                )

    # -- (a) never drop a frozen weight -------------------------------------------------

    def forbidden_drop(self) -> Mask:
        """Bool mask of weights DST must not drop (copies of the frozen mask)."""
        return {n: f.clone() for n, f in self.frozen.items()}

    def protect_drop_scores(self, drop_scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Drop scores with frozen entries set to +inf, so ``drop_lowest`` never picks them.

        Lets a protected prune/grow reuse the unmodified selection functions of
        ``strategies.sparse.prune_grow``.
        """
        out: dict[str, torch.Tensor] = {}
        for n, s in drop_scores.items():
            f = self.frozen.get(n)
            out[n] = s if f is None else torch.where(f, torch.tensor(float("inf")), s.float())
        return out

    def frozen_outside(self, mask: Mask) -> int:
        """How many frozen weights a (e.g. server consensus) mask would deactivate."""
        self._check_keys(mask, "mask")
        return int(sum(int((f & ~mask[n].bool()).sum()) for n, f in self.frozen.items()))

    # -- (b) freeze -----------------------------------------------------------------

    def zero_frozen_grads(self, model: nn.Module) -> None:
        """Call after backward: frozen weights receive no gradient."""
        params = dict(model.named_parameters())
        for n, f in self.frozen.items():
            p = params.get(n)
            if p is not None and p.grad is not None:
                p.grad.masked_fill_(f, 0.0)

    @torch.no_grad()
    def restore_frozen(self, model: nn.Module) -> None:
        """Call after the optimizer step: reset frozen weights to their anchor values.

        Zero gradients alone do not freeze under SGD weight decay or momentum.
        """
        params = dict(model.named_parameters())
        for n, f in self.frozen.items():
            if n in self.anchor and n in params and bool(f.any()):
                p = params[n]
                p.copy_(torch.where(f, self.anchor[n].to(p.dtype), p))

    # -- (c) EWC penalty --------------------------------------------------------------

    def penalty(self, model: nn.Module, strength: float = 1.0) -> torch.Tensor:
        """EWC: strength/2 * sum_i F_i (theta_i - theta*_i)^2 (Kirkpatrick et al. 2017).

        Zero (with grad graph) before the first consolidation with importance scores.
        """
        params = dict(model.named_parameters())
        total = torch.zeros(())
        for n, imp in self.importance.items():
            p = params[n]
            total = total + (imp * (p.float() - self.anchor[n]) ** 2).sum()
        return 0.5 * strength * total

    # -- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "experiences": self.experiences,
            "frozen": {n: f.clone() for n, f in self.frozen.items()},
            "importance": {n: t.clone() for n, t in self.importance.items()},
            "anchor": {n: t.clone() for n, t in self.anchor.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        frozen = state["frozen"]
        self._check_keys(frozen, "state['frozen']")
        self.frozen = {n: frozen[n].bool().clone() for n in self.frozen}
        self.importance = {n: t.float().clone() for n, t in state["importance"].items()}
        self.anchor = {n: t.float().clone() for n, t in state["anchor"].items()}
        self.experiences = int(state["experiences"])
