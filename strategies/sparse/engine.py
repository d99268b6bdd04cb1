"""DSTController: owns the mask of one model and runs dense/static/SET/RigL/GMP topology updates.

Usage per training step (replaces ``optimizer.step()``)::

    loss.backward()
    controller.after_backward()   # RigL: keep dense |grad| at update steps; zero masked grads
    changed = controller.step()   # optimizer.step(); re-mask; prune/grow at update steps

Rules:
- ``dense``  all-ones mask, no updates (reference).
- ``static`` random ERK/uniform mask fixed for the whole run (control).
- ``set``    magnitude drop + random grow (Mocanu et al. 2018).
- ``rigl``   magnitude drop + dense-gradient grow (Evci et al. 2020); drop fraction
             f(t) = alpha/2 (1 + cos(pi t / T_end)) every ``update_interval`` steps.
- ``gmp``    starts dense and magnitude-prunes to the cubic schedule density (Zhu & Gupta
             2017) -- "shed parameters while learning"; never regrows.
- ``channel`` RigL over whole output units where the model declares unit groups
             (``units.UnitGroup``), constant fan-in elsewhere; ``srigl`` constant fan-in
             everywhere (Lasby et al. 2023); ``nm`` 2:4 groups (``structured``). Dead units'
             biases / BN shifts are held at 0 so ``condense`` can remove them exactly.

Per layer, n_drop = round(f * active_l), capped at the layer's inactive count so the grow set
(taken from entries inactive BEFORE the drop) always exists. Invariants, checked in code:
the active count per layer is kept by prune+grow, dropped and grown sets are disjoint, grown
weights are exactly 0 and their optimizer state (SGD ``momentum_buffer``, Adam/AdamW
``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``, any per-parameter state tensor) is reset at
those positions, masked weights are exactly 0 after every step (weight decay and momentum
would otherwise move them) and masked gradients are zeroed. Structured rules plug in through
``prune_grow.register_drop_rule`` / ``register_grow_rule`` and ``RULE_TABLE`` here.
All randomness comes from one ``torch.Generator`` so runs are reproducible given its seed.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from strategies.sparse.dst_config import RULE_TABLE, RULES, STRUCTURED_RULES, DSTConfig
from strategies.sparse.layout import plan_densities, planned_random_mask, unit_rows
from strategies.sparse.masks import (
    Mask,
    OffMasks,
    Predicate,
    mask_density,
    ones_mask,
    target_active_count,
    validate_mask,
)
from strategies.sparse.prune_grow import (
    LayerState,
    get_drop_rule,
    get_grow_rule,
    magnitude_prune_to,
)
from strategies.sparse.saliency import LossFn, saliency_mask, saliency_scores
from strategies.sparse.schedules import CosineDecay, GMPSchedule
from strategies.sparse.scores import magnitude_score
from strategies.sparse.selection import predicate_selection, select_sparsifiable
from strategies.sparse.sgd_step import sgd_step
from strategies.sparse.structured import ablate_units, structured_init
from strategies.sparse.structured_rules import STRUCTURES, layer_structures
from strategies.sparse.unit_step import (
    UnitViews,
    check_regrow_inputs,
    prune_grow_unit,
    reset_optimizer_state,
)
from strategies.sparse.units import unit_groups, zero_dead_shifts

__all__ = ["RULES", "RULE_TABLE", "STRUCTURED_RULES", "DSTConfig", "DSTController"]


class DSTController:
    """Owns ``mask`` for ``model`` and performs the optimizer step plus topology updates.

    The initial mask is ``mask`` if given (validated; used as-is for every rule, so a
    federated client can start from the server consensus), else all-ones for ``dense`` and
    ``gmp``, else a random mask with per-layer densities from ``config.distribution``.
    ``regrow`` and ``set_mask`` work for every rule (e.g. ``static`` within a federated round).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: DSTConfig,
        total_steps: int,
        *,
        mask: Mask | None = None,
        generator: torch.Generator | None = None,
        predicate: Predicate | None = None,
        init_loss_fn: LossFn | None = None,
    ) -> None:
        config.validate()
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.total_steps = total_steps
        # A fixed default seed keeps runs reproducible when the caller passes no generator.
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        if predicate is None:
            # Known layer kernels only, one mask per storage, fused q/k/v as three slices.
            self.selection = select_sparsifiable(
                model, exclude=config.exclude, embeddings=config.embeddings
            )
        else:  # legacy: a (name, tensor) predicate over every parameter name
            self.selection = predicate_selection(model, predicate)
        self._params: dict[str, nn.Parameter] = dict(self.selection.params)
        self.shapes: dict[str, torch.Size] = {n: p.shape for n, p in self._params.items()}
        # Structured rules keep whole tensors as their units (channels/rows span q, k and v).
        self.slices: dict[str, int] = (
            {} if config.rule in STRUCTURED_RULES else dict(self.selection.slices)
        )
        self.step_count = 0
        self._dense_grads: dict[str, torch.Tensor] = {}
        self.groups = unit_groups(model) if config.rule in STRUCTURED_RULES else []
        self.structure = self._structures(config.rule)
        # Multi-row units (attention heads): channel rules see [units, rows of a unit * fan_in].
        self.views = UnitViews(self.groups, self.shapes, self.structure)
        # srigl: constant fan-in plus neuron ablation where a unit can really be removed
        self._ablatable = {g.producer for g in self.groups} if config.rule == "srigl" else set()

        self.cosine: CosineDecay | None = None
        self.gmp: GMPSchedule | None = None
        if config.rule in RULE_TABLE:
            self.cosine = CosineDecay(
                config.drop_fraction,
                config.update_interval,
                end_step=int(config.end_fraction * total_steps),
            )
        elif config.rule == "gmp":
            start = int(config.gmp_start_fraction * total_steps)
            end = max(start + 1, int(config.gmp_end_fraction * total_steps))
            self.gmp = GMPSchedule(config.density, start, end, config.update_interval)

        if mask is not None:
            validate_mask(mask, self.shapes)
            init = {k: v.clone() for k, v in mask.items()}
        elif config.rule in ("dense", "gmp"):
            init = ones_mask(self.shapes)
        elif config.rule in STRUCTURED_RULES:
            densities = self.planned_densities(config.density)
            shapes = {n: self.views.shape(n) for n in self.shapes}
            init = structured_init(shapes, densities, self.structure, self.generator)
            init = {n: self.views.unview(n, m) for n, m in init.items()}
        else:
            densities = self.planned_densities(config.density)
            if config.init == "random":
                init = planned_random_mask(self.shapes, densities, self.slices, self.generator)
            else:
                scores = saliency_scores(config.init, model, self._params, init_loss_fn)
                init = saliency_mask(scores, densities, self.slices)
        self._start(init)

    def _start(self, init: Mask) -> None:
        self.mask: Mask = {n: init[n].to(self._params[n].device) for n in self.shapes}
        self._off = OffMasks()  # ~mask per step, reused while the mask stays the same
        self._apply()
        for n, m in self.mask.items():  # optimizer may already hold state (e.g. resumed)
            self._reset_optimizer_state(n, self._off(n, m))  # no state: a no-op

    def restart(self, mask: Mask, generator: torch.Generator) -> None:
        """Become what a controller built now on the same model, optimizer and config with
        ``mask`` and ``generator`` would be: step 0, no captured gradient, ``mask`` applied.
        What the model's structure gives (selection, units, schedules) is kept."""
        validate_mask(mask, self.shapes)
        self.generator = generator
        self.step_count = 0
        self._dense_grads = {}
        self._start({k: v.clone() for k, v in mask.items()})

    # -- queries --------------------------------------------------------------------------

    def planned_densities(self, density: float) -> dict[str, float]:
        """Per-unit densities of this run's layer rule at overall ``density``."""
        return plan_densities(
            self.shapes,
            density,
            distribution=self.config.distribution,
            slices=self.slices,
            erk_power_scale=self.config.erk_power_scale,
            overrides=dict(self.config.density_overrides),
        )

    @property
    def density(self) -> float:
        """Current overall density of the masked tensors."""
        return mask_density(self.mask)

    def is_update_step(self, step: int) -> bool:
        """Whether completing optimizer step ``step`` (1-based) triggers a topology update."""
        if self.cosine is not None:
            return self.cosine(step) is not None
        if self.gmp is not None:
            return self.gmp(step) is not None
        return False

    # -- the training-step hooks -----------------------------------------------------------

    def after_backward(self) -> None:
        """Call after ``loss.backward()``: capture RigL's dense grads, zero masked grads."""
        if self.config.rule == "dense":
            return
        upcoming = self.step_count + 1
        rigl_like = self.config.rule == "rigl" or self.config.rule in STRUCTURED_RULES
        capture = rigl_like and self.is_update_step(upcoming)
        self._dense_grads = {}
        for n, p in self._params.items():
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise ValueError(f"{n}: sparse gradients are not supported; use dense grads")
            if capture:
                # |dL/dW| over the FULL tensor, before masking: RigL's grow score (the dense
                # gradient is already computed by autograd on dense kernels).
                self._dense_grads[n] = g.detach().clone()
            g.masked_fill_(self._off(n, self.mask[n]), 0.0)

    def step(self, scaler: Any | None = None) -> dict[str, int]:
        """``optimizer.step()`` (or ``scaler.step`` + ``update``), then ``after_optimizer_step``.

        With AMP, pass the ``torch.amp.GradScaler``: a step the scaler skips (inf/NaN
        gradients) still counts for the schedule but makes no topology update.
        """
        if scaler is None:
            if not sgd_step(self.optimizer):  # plain CPU SGD: the same ops, less wrapping
                self.optimizer.step()
            return self.after_optimizer_step()
        before = float(scaler.get_scale())
        scaler.step(self.optimizer)
        scaler.update()
        skipped = float(scaler.get_scale()) < before  # the scaler backs off after inf grads
        return self.after_optimizer_step(skip_topology=skipped)

    def after_optimizer_step(self, *, skip_topology: bool = False) -> dict[str, int]:
        """Re-mask and prune/grow at update steps, for loops that step the optimizer themselves.

        Any optimizer works: the controller never needs to call it. Returns the counts.
        """
        self.step_count += 1
        if any(not bool(torch.isfinite(g).all()) for g in self._dense_grads.values()):
            skip_topology = True  # an overflowed (AMP) gradient must not pick the grow set
        # Weight decay and momentum move masked weights off zero; re-zero them (RigL does
        # the same by re-applying the mask after every update).
        self._apply()
        out = {"dropped": 0, "grown": 0}
        if skip_topology:
            self._dense_grads = {}
            return out
        if self.cosine is not None:
            fraction = self.cosine(self.step_count)
            if fraction is not None:
                drop_name, grow_name = RULE_TABLE[self.config.rule]
                if grow_name.endswith("gradient") and not self._dense_grads:
                    raise RuntimeError(
                        f"step {self.step_count} is a RigL update step but no dense gradient "
                        "was captured: call after_backward() after loss.backward()"
                    )
                out = self._prune_grow(fraction, drop_name, grow_name, self._dense_grads)
        elif self.gmp is not None:
            d = self.gmp(self.step_count)
            if d is not None:
                out = self._gmp_prune(d)
        self._dense_grads = {}
        return out

    def regrow(
        self,
        fraction: float,
        grow_scores: dict[str, torch.Tensor] | None = None,
        *,
        protected: Mask | None = None,
    ) -> dict[str, int]:
        """Extra drop+regrow event: magnitude drop, grow by ``grow_scores`` (else random).

        Used by drift/task triggers and federated readjustment rounds. ``grow_scores[name]``
        (e.g. |dense grad|) is used where given; layers without one grow at random.
        ``protected`` (optional extension) marks weights never to be dropped (e.g. frozen
        weights of earlier tasks).
        """
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"regrow fraction must be in [0, 1], got {fraction}")
        scores = dict(grow_scores or {})
        check_regrow_inputs(self.shapes, scores, protected)
        drop, grow, fallback = "magnitude", "gradient", "random"
        if self.config.rule in STRUCTURED_RULES:
            drop, grow, fallback = (*RULE_TABLE[self.config.rule], "structured-random")
        return self._prune_grow(
            fraction, drop, grow, scores, fallback_grow=fallback, protected=protected
        )

    def set_mask(self, mask: Mask) -> None:
        """Adopt ``mask`` (e.g. the server consensus), apply it, reset changed optimizer state.

        Values at newly activated positions are kept (the caller may have just loaded them
        from the server); positions that change state get fresh optimizer state.
        """
        validate_mask(mask, self.shapes)
        for n in self.shapes:
            new = mask[n].to(self._params[n].device).clone()
            changed = new ^ self.mask[n]
            self.mask[n] = new
            self._reset_optimizer_state(n, changed)
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """Small resumable state: the mask (CPU bool tensors) and the step count."""
        return {
            "mask": {n: m.detach().cpu().clone() for n, m in self.mask.items()},
            "step_count": self.step_count,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output (mask validated against this model)."""
        if "mask" not in d or "step_count" not in d:
            raise ValueError(f"controller state needs 'mask' and 'step_count', got {sorted(d)}")
        step = d["step_count"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"controller state step_count must be an int >= 0, got {step!r}")
        self.set_mask(d["mask"])
        self.step_count = step

    def check_invariants(self) -> None:
        """Raise RuntimeError unless every masked weight is exactly zero."""
        for n, p in self._params.items():
            if bool((p.detach()[~self.mask[n]] != 0).any()):
                raise RuntimeError(f"{n}: masked weights are not exactly zero")

    # -- internals ---------------------------------------------------------------------------

    def _structures(self, rule: str) -> dict[str, str]:
        out = layer_structures(rule, self.shapes, {g.producer for g in self.groups})
        assert set(out.values()) <= {*STRUCTURES, "none"}
        return out

    def _apply(self) -> None:
        with torch.no_grad():
            for n, p in self._params.items():
                p.masked_fill_(self._off(n, self.mask[n]), 0.0)
        if self.groups:
            zero_dead_shifts(self.model, self.mask, self.groups)

    def _reset_optimizer_state(self, name: str, positions: torch.Tensor) -> None:
        reset_optimizer_state(self.optimizer, self._params[name], positions)

    def _units(self, name: str) -> list[slice]:
        return unit_rows(name, self.shapes[name], self.slices.get(name, 1))

    def _prune_grow(
        self,
        fraction: float,
        drop_name: str,
        grow_name: str,
        grads: dict[str, torch.Tensor],
        *,
        fallback_grow: str = "random",
        protected: Mask | None = None,
    ) -> dict[str, int]:
        drop_rule = get_drop_rule(drop_name)
        dropped_total = grown_total = 0
        for n, p in self._params.items():
            grad = grads.get(n)
            grow_rule = get_grow_rule(grow_name if grad is not None else fallback_grow)
            prot = None if protected is None or n not in protected else protected[n]
            new_full = self.mask[n].clone()
            changed = torch.zeros_like(new_full)
            updated = 0
            # Each unit (a layer, or one slice of a fused q/k/v projection) keeps its own
            # active count: budgets never move between slices.
            view, unview = partial(self.views.view, n), partial(self.views.unview, n)
            for rows in self._units(n):  # multi-row units: one full slice, seen unit-major
                m = view(self.mask[n][rows])
                pr = None if prot is None else view(prot[rows].to(m.device))
                g = None if grad is None else view(grad[rows])
                layer = LayerState(
                    n, view(p.detach()[rows]), m, g, self.generator, self.structure[n]
                )
                moved = prune_grow_unit(layer, fraction, pr, drop_rule, grow_rule)
                if moved is None:
                    continue
                dropped, grown = moved
                k = int(dropped.sum())
                new = (m & ~dropped) | grown
                new_full[rows] = unview(new)
                changed[rows] = unview(dropped | grown)
                with torch.no_grad():
                    # Grown weights start at exactly 0 (RigL); dropped ones are masked below.
                    p[rows].masked_fill_(unview(grown), 0.0)
                dropped_total += k
                grown_total += k
                updated += k
            if updated and grad is not None and n in self._ablatable:
                # SRigL neuron ablation on declared unit producers (see structured.ablate_units)
                ablated = ablate_units(new_full, p, grad, updated)
                with torch.no_grad():
                    p.masked_fill_(ablated & ~new_full, 0.0)  # re-activated: start at 0
                changed |= ablated ^ new_full
                new_full = ablated
            self.mask[n] = new_full
            with torch.no_grad():
                p.masked_fill_(~new_full, 0.0)
            self._reset_optimizer_state(n, changed)
        if self.groups:  # units that just died: their bias / BN shift goes to 0 too
            zero_dead_shifts(self.model, self.mask, self.groups)
        return {"dropped": dropped_total, "grown": grown_total}

    def _gmp_prune(self, density: float) -> dict[str, int]:
        # Per-unit targets from the layer rule applied to the scheduled density.
        targets = self.planned_densities(density) if density < 1.0 else None
        dropped_total = 0
        for n, p in self._params.items():
            new_full = self.mask[n].clone()
            for i, rows in enumerate(self._units(n)):
                m = self.mask[n][rows]
                unit = n if self.slices.get(n, 1) <= 1 else f"{n}#{i}"
                target = (
                    m.numel() if targets is None else target_active_count(m.numel(), targets[unit])
                )
                new = magnitude_prune_to(m, magnitude_score(p.detach()[rows]), target)
                if bool((new & ~m).any()):
                    raise RuntimeError(f"{n}: GMP must never grow")
                new_full[rows] = new
            dropped = self.mask[n] & ~new_full
            self.mask[n] = new_full
            self._reset_optimizer_state(n, dropped)
            dropped_total += int(dropped.sum())
        self._apply()
        return {"dropped": dropped_total, "grown": 0}
