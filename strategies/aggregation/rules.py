"""The strategy plug-in API: aggregation rules (stateless or stateful) and consensus-mask votes.

An `AggregationRule` sees one round (`RoundInput`: round number, consensus mask, the
global values sent, the accepted client updates with their metrics), returns the next
global values, may keep state (``state_dict``/``load_state_dict``, saved in every
checkpoint so a resumed run continues bit-identically) and may propose the next
consensus mask (``propose_mask``; ``None`` leaves it to the vote rule). A plain merge
function ``(updates, previous) -> values`` keeps working: `as_rule` wraps it.

Run config: ``aggregation.rule`` names a rule (built-in, ``leanfed.merge_rules`` /
``leanfed.strategies`` entry point, or "module:attr"), ``aggregation.options.*`` are its
keyword arguments, ``aggregation.vote`` names the mask vote (``leanfed.vote_rules``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from strategies.aggregation.merge import (
    ClientUpdate,
    Median,
    MergeOptions,
    MergeRule,
    TrimmedMean,
    consensus_mask,
    masked_weighted_mean,
    robust_factory,
)
from strategies.aggregation.robust import robust_consensus_mask
from strategies.plugins import PluginError, Registry, check_options, option_kwargs
from strategies.sparse.masks import Mask

__all__ = [
    "MERGE_RULES",
    "VOTE_RULES",
    "AggregationRule",
    "FunctionRule",
    "RoundInput",
    "VoteRule",
    "as_rule",
    "build_rule",
    "build_vote",
    "get_merge_rule",
]


@dataclass(frozen=True)
class RoundInput:
    """What a rule sees in one round (all tensors full-shape, keyed like the state_dict)."""

    server_round: int
    mask: Mask  # consensus mask the clients trained under (bool, sparsified keys only)
    previous: dict[str, torch.Tensor]  # global values sent this round (zeros off the mask)
    updates: list[ClientUpdate]  # accepted replies; .metrics holds train_loss, ...
    # per masked key: "channel" | "fanin" | "nm" (structured DST rules) or "none"
    structure: Mapping[str, str] = field(default_factory=dict)
    # per channel key whose unit is several rows (attention heads): [units, rows of a unit]
    unit_rows: Mapping[str, torch.Tensor] = field(default_factory=dict)


class AggregationRule:
    """Base class of a server rule: override `aggregate`; stateful rules override the rest."""

    def aggregate(self, rnd: RoundInput) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def propose_mask(
        self, rnd: RoundInput, merged: dict[str, torch.Tensor], targets: dict[str, float]
    ) -> Mask | None:
        """The next consensus mask, or None to let the vote rule decide (the default)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers, strings, lists and dicts only (checkpoints load weights_only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} is stateless but got state {sorted(state)}")


class FunctionRule(AggregationRule):
    """A stateless merge function ``(updates, previous) -> values`` as a rule."""

    def __init__(self, fn: MergeRule | Callable[..., Any], label: str | None = None) -> None:
        self.fn = fn
        self.label: str = label or str(getattr(fn, "__name__", repr(fn)))

    def aggregate(self, rnd: RoundInput) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = self.fn(rnd.updates, rnd.previous)
        return out

    def __repr__(self) -> str:
        return self.label


def as_rule(obj: AggregationRule | MergeRule) -> AggregationRule:
    """An `AggregationRule` unchanged; a merge function wrapped in `FunctionRule`."""
    if isinstance(obj, AggregationRule):
        return obj
    if not callable(obj):
        raise TypeError(f"merge rule must be a callable or an AggregationRule, got {obj!r}")
    return FunctionRule(obj)


class VoteRule(Protocol):
    """``(round, merged values, per-layer target densities) -> next consensus mask``."""

    def __call__(
        self, rnd: RoundInput, merged: dict[str, torch.Tensor], targets: dict[str, float], /
    ) -> Mask: ...


@dataclass(frozen=True)
class RunRule:
    """A built-in made from the run's `MergeOptions` (aggregation.trim, .num-malicious, ...);
    ``aggregation.options.*`` may override those fields by name."""

    make: Callable[[MergeOptions], MergeRule]


# Built-ins and plug-ins: a merge function, an AggregationRule subclass, a factory
# returning either, or a RunRule. Options are bound as keyword arguments.
MERGE_RULES: Registry[Any] = Registry(
    "merge rule", ("leanfed.merge_rules", "leanfed.strategies"), "aggregation.rule"
)
MERGE_RULES.register("mean", RunRule(lambda o: masked_weighted_mean))
MERGE_RULES.register("median", RunRule(lambda o: Median(o.support)))
MERGE_RULES.register(
    "trimmed-mean", RunRule(lambda o: TrimmedMean(o.trim, o.num_malicious, o.support))
)
for _name in ("clipped-median", "krum", "multi-krum", "bulyan"):
    MERGE_RULES.register(_name, RunRule(robust_factory(_name)))


def weighted_vote(
    rnd: RoundInput, merged: dict[str, torch.Tensor], targets: dict[str, float]
) -> Mask:
    """FedDST: examples-weighted mask votes, top-k per layer, ties by |merged value|."""
    return consensus_mask(
        rnd.updates, targets, merged, rnd.structure or None, rnd.unit_rows or None
    )


def robust_vote(
    rnd: RoundInput, merged: dict[str, torch.Tensor], targets: dict[str, float]
) -> Mask:
    """Capped vote weights, ties by the previous consensus mask (strategies.aggregation.robust)."""
    return robust_consensus_mask(rnd.updates, targets, rnd.mask)


VOTE_RULES: Registry[VoteRule] = Registry("vote rule", ("leanfed.vote_rules",), "aggregation.vote")
VOTE_RULES.register("weighted", weighted_vote)
VOTE_RULES.register("robust", robust_vote)


def _is_factory(obj: Any) -> bool:
    """A class, or a callable with no positional parameters: called with the options."""
    if inspect.isclass(obj):
        return True
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return not any(p.kind in positional and p.default is p.empty for p in params)


def build_rule(
    spec: str | AggregationRule | MergeRule,
    options: Mapping[str, Any] | None = None,
    run_options: MergeOptions | None = None,
) -> AggregationRule:
    """Resolve ``aggregation.rule`` and bind ``aggregation.options.*`` to it.

    A built-in `RunRule` is made from ``run_options`` (fields overridable by options); a
    merge function takes the options after ``(updates, previous)``; a class or
    zero-argument factory is called with them and must give a rule.
    """
    opts = dict(options or {})
    obj: Any = MERGE_RULES.resolve(spec) if isinstance(spec, str) else spec
    if isinstance(obj, RunRule):
        check_options(MergeOptions, 0, opts, "aggregation.options")
        base = dataclasses.replace(run_options or MergeOptions(), **option_kwargs(opts))
        return FunctionRule(obj.make(base), str(spec))
    if isinstance(obj, AggregationRule):
        if opts:
            raise PluginError(f"aggregation.options: {obj!r} is an instance, it takes no options")
        return obj
    if not callable(obj):
        raise PluginError(f"aggregation.rule = {spec!r} is not callable")
    if _is_factory(obj):
        check_options(obj, 0, opts, "aggregation.options")
        made = obj(**option_kwargs(opts))
        if isinstance(made, AggregationRule):
            return made
        if callable(made):
            return FunctionRule(made)
        raise PluginError(f"aggregation.rule = {spec!r}: the factory returned {made!r}")
    check_options(obj, 2, opts, "aggregation.options")
    name = getattr(obj, "__name__", repr(obj))
    if not opts:
        return FunctionRule(obj, name)
    label = f"{name}({', '.join(f'{k}={v}' for k, v in opts.items())})"
    return FunctionRule(functools.partial(obj, **option_kwargs(opts)), label)


def get_merge_rule(
    rule: str | MergeRule, trim: float = 0.2, options: MergeOptions | None = None
) -> MergeRule:
    """The plain merge function a stateless rule name stands for (callables pass through)."""
    if not isinstance(rule, str):
        if not callable(rule):
            raise TypeError(f"merge rule must be a name or a callable, got {rule!r}")
        return rule
    built = build_rule(rule, None, options if options is not None else MergeOptions(trim=trim))
    if not isinstance(built, FunctionRule):
        raise TypeError(f"merge rule {rule!r} is a stateful AggregationRule: use build_rule")
    fn: MergeRule = built.fn
    return fn


def build_vote(spec: str | VoteRule) -> VoteRule:
    """Resolve ``aggregation.vote`` (default "weighted", FedDST's top-k vote)."""
    vote = VOTE_RULES.resolve(spec) if isinstance(spec, str) else spec
    if not callable(vote):
        raise PluginError(f"aggregation.vote = {spec!r} is not callable")
    return vote


# The shipped server optimizers register themselves into MERGE_RULES on import.
from strategies.aggregation import server_opt as _server_opt  # noqa: E402, F401
