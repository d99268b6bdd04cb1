"""Validate client replies before merging: records, metrics, payload, shapes, bounds, norms.

A bad client never raises out of here and is never averaged in: every reply gets a
`Verdict`, accepted or rejected with a one-line reason naming what was wrong. Checks, in
order (the first failing one is the reason):

1. an error reply is recorded with its (cut, printable) reason;
2. one reply per node per round: a node not sent a message this round, or a node's second
   and later replies, are rejected; the FIRST reply is judged and, if accepted, its update
   AND its metrics are the ones used;
3. exactly the expected records (`wire.check_records`) and metrics (`metric_rules`),
   "num-examples" capped by ``max_num_examples`` and the node's partition size if known;
   then the strategy's own check of the checked metrics, if it has one (record-level DP:
   the site's epsilon recomputed, `site_epsilon.SiteEpsilonCheck`);
4. the payload decodes against the model's spec (`codec` checks names, shapes, dtypes
   and mask kinds before allocating);
5. `check_update`: keys, shapes, dtypes, values finite with |v| <= ``max_abs``, masks bool
   with nothing outside them, per-layer and overall density bounds;
6. `NormBound`: the update's L2 distance to the global model sent, over the coordinates
   the client keeps, is at most ``factor`` x the median of this round's candidates and
   last round's accepted norms (and at most ``max_norm`` if set).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Message

from strategies.aggregation.merge import ClientUpdate
from strategies.aggregation.metric_rules import WEIGHT_KEY, check_metrics
from strategies.aggregation.wire import Decoded, ReplyError, check_records, error_text
from strategies.codec import CodecError, TensorSpec
from strategies.sparse.masks import Mask

MAX_INT_ABS = 2**53  # integer tensors (e.g. num_batches_tracked): exact in the float64 merge
_NUMPY_FLOATS = (torch.float32, torch.float64)  # checked on their numpy views


@dataclass(frozen=True)
class Verdict:
    """What became of one reply. `metrics`: its checked metrics (accepted replies only)."""

    node_id: int
    accepted: bool
    reason: str | None = None
    metrics: dict[str, int | float] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplyLimits:
    """Run-config bounds on replies (``aggregation.*`` keys; see `tasks.config`)."""

    max_num_examples: int = 1_000_000
    max_abs: float = 1e6  # |value| of any float entry
    norm_factor: float = 10.0  # k in "norm <= k x running median"; 0 disables
    max_norm: float = 0.0  # absolute L2 bound on an update; 0 = none
    # node_id -> partition size, where the server knows it (e.g. simulations)
    partition_sizes: Mapping[int, int] = field(default_factory=dict)

    def examples_cap(self, node: int) -> int:
        size = self.partition_sizes.get(node)
        return self.max_num_examples if size is None else min(size, self.max_num_examples)


@dataclass(frozen=True)
class ModelSpec:
    """What an acceptable update looks like (taken from the current global model)."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    mask_keys: frozenset[str]  # the sparsified keys; each must carry a mask entry
    max_density: float = 1.0  # overall density bound over the masked tensors
    tolerance: float = 0.0
    # per masked key, its density bound before tolerance (missing: max_density)
    layer_max_density: dict[str, float] = field(default_factory=dict)
    max_abs: float = 1e6

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, torch.Tensor],
        mask: Mask,
        max_density: float = 1.0,
        tolerance: float = 0.0,
        layer_max_density: Mapping[str, float] | None = None,
        max_abs: float = 1e6,
    ) -> ModelSpec:
        return cls(
            shapes={k: tuple(v.shape) for k, v in state.items()},
            dtypes={k: v.dtype for k, v in state.items()},
            mask_keys=frozenset(mask),
            max_density=max_density,
            tolerance=tolerance,
            layer_max_density=dict(layer_max_density or {}),
            max_abs=max_abs,
        )

    def wire(self) -> dict[str, TensorSpec]:
        """The codec's spec of an acceptable payload."""
        return {
            k: TensorSpec(s, self.dtypes[k], k in self.mask_keys) for k, s in self.shapes.items()
        }


def _check_values(key: str, t: torch.Tensor, max_abs: float) -> str | None:
    if t.dtype.is_floating_point:
        if not bool(torch.isfinite(t).all()):
            return f"{key!r}: contains NaN or Inf"
        if t.numel() and float(t.abs().max()) > max_abs:
            return f"{key!r}: |value| {float(t.abs().max()):.4g} exceeds bound {max_abs:g}"
    elif t.dtype != torch.bool and t.numel() and int(t.abs().max()) > MAX_INT_ABS:
        return f"{key!r}: integer value beyond 2^53"
    return None


def _all_clean(update: ClientUpdate, spec: ModelSpec) -> bool:
    """True when every per-key check of values and masks in `check_update` would pass.

    The same conditions over all float tensors at once and over all masked values at
    once: a server checks thousands of replies of a few small tensors each, where
    per-tensor op overhead dominates. float32/float64 tensors with bool masks (what the
    codec decodes) are checked on their numpy views, whose ops cost a few microseconds
    less each than torch's; anything else takes the torch path. False sends
    `check_update` through the per-key loop for the exact reason.
    """
    floats: list[torch.Tensor] = []
    outside: list[torch.Tensor] = []
    for key, t in update.values.items():
        if tuple(t.shape) != spec.shapes[key] or t.dtype != spec.dtypes[key]:
            return False
        m = update.mask.get(key)
        if m is not None and (m.dtype != torch.bool or tuple(m.shape) != spec.shapes[key]):
            return False
        if t.dtype in _NUMPY_FLOATS and t.numel():
            a = t.detach().numpy()
            peak = float(np.abs(a).max())  # NaN if any entry is NaN
            if not (math.isfinite(peak) and peak <= spec.max_abs):
                return False
            # nonzero off the mask: more nonzeros in the tensor than in its kept entries
            if m is not None and np.count_nonzero(a) != np.count_nonzero(a[m.numpy()]):
                return False
            continue
        if t.dtype.is_floating_point:
            floats.append(t.reshape(-1))
        elif _check_values(key, t, spec.max_abs) is not None:
            return False
        if m is not None:
            # nonzero AND off the mask, elementwise (no gather of the off-mask entries)
            outside.append(t.ne(0).logical_and_(m.logical_not()).reshape(-1))
    if floats:
        flat = torch.cat(floats)
        if flat.numel() and not (
            bool(torch.isfinite(flat).all()) and float(flat.abs().max()) <= spec.max_abs
        ):
            return False
    return not (outside and bool(torch.cat(outside).any()))


def check_update(update: ClientUpdate, spec: ModelSpec, clean: bool | None = None) -> str | None:
    """The reason `update` is unacceptable, or None when it is fine (norms: `NormBound`).

    ``clean``: `_all_clean`'s answer for these very values and masks (see `screen`), when
    it was computed earlier; None computes it here.
    """
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        return f"num_examples must be a positive int, got {n!r}"
    if set(update.values) != set(spec.shapes):
        missing = sorted(set(spec.shapes) - set(update.values))
        extra = sorted(set(update.values) - set(spec.shapes))
        return f"key set differs: missing {missing}, unexpected {extra}"
    if set(update.mask) != set(spec.mask_keys):
        missing = sorted(spec.mask_keys - set(update.mask))
        extra = sorted(set(update.mask) - spec.mask_keys)
        return f"mask key set differs: missing {missing}, unexpected {extra}"
    if clean is None:  # one pass over all tensors; per key only on a failure
        clean = _all_clean(update, spec)
    if not clean:
        for key, t in update.values.items():
            if tuple(t.shape) != spec.shapes[key]:
                return f"{key!r}: shape {tuple(t.shape)}, expected {spec.shapes[key]}"
            if t.dtype != spec.dtypes[key]:
                return f"{key!r}: dtype {t.dtype}, expected {spec.dtypes[key]}"
            problem = _check_values(key, t, spec.max_abs)
            if problem is not None:
                return problem
    active, total = 0, 0
    slack = spec.tolerance + 1e-12
    for key, m in update.mask.items():
        if m.dtype != torch.bool or tuple(m.shape) != spec.shapes[key]:
            return f"{key!r}: mask must be bool {spec.shapes[key]}, got {m.dtype} {tuple(m.shape)}"
        if not clean and bool((update.values[key][~m] != 0).any()):
            return f"{key!r}: nonzero values outside the mask"
        kept = int(m.sum())
        bound = spec.layer_max_density.get(key, spec.max_density)
        if m.numel() and kept / m.numel() > bound + slack:
            return (
                f"{key!r}: layer density {kept / m.numel():.4f} exceeds bound {bound:.4f} "
                f"+ tolerance {spec.tolerance:.4f}"
            )
        active += kept
        total += m.numel()
    density = active / total if total else 0.0
    if density > spec.max_density + slack:
        return (
            f"mask density {density:.4f} exceeds bound {spec.max_density:.4f} "
            f"+ tolerance {spec.tolerance:.4f}"
        )
    return None


def update_norm(update: ClientUpdate, previous: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of (values - previous) over the coordinates the client keeps (float64).

    Summed per key with numpy's pairwise sum where both tensors have numpy views (fp32 /
    fp64, bool mask), else with torch; either way the same function for every reply, so
    early and late screening agree bit for bit.
    """
    total = 0.0
    for key, v in update.values.items():
        p, m = previous[key], update.mask.get(key)
        if v.dtype in _NUMPY_FLOATS and p.dtype in _NUMPY_FLOATS:
            a, b = v.detach().numpy(), p.detach().numpy()
            if m is not None:
                keep = m.numpy()
                a, b = a[keep], b[keep]
            d = np.subtract(a, b, dtype=np.float64)
            total += float(np.sum(d * d))  # pairwise sum: same bits in every process
            continue
        diff = v.to(torch.float64) - p.to(torch.float64)
        if m is not None:
            diff = diff[m]
        total += float((diff * diff).sum())
    return math.sqrt(total)


@dataclass(frozen=True)
class Screened:
    """The work on one train reply that depends on its payload alone, done ahead of time.

    ``clean`` is `_all_clean`'s answer and ``norm`` `update_norm`'s, or None where
    `check_update` would not reach them (wrong key sets; a failing value check).
    """

    values: dict[str, torch.Tensor]
    mask: Mask
    clean: bool | None
    norm: float | None


def screen(decoded: Decoded, spec: ModelSpec, previous: Mapping[str, torch.Tensor]) -> Screened:
    """`validate_replies`' payload checks of one decoded reply, in its order (no verdict).

    A server can run this while later replies are still being computed (the embedded
    engine does); the verdict, which needs every reply of the round, comes later.
    """
    values, mask = decoded
    clean = norm = None
    if set(values) == set(spec.shapes) and set(mask) == set(spec.mask_keys):
        probe = ClientUpdate(0, values, mask, 1)
        clean = _all_clean(probe, spec)
        if clean:
            norm = update_norm(probe, previous)
    return Screened(values, mask, clean, norm)


class NormBound:
    """Reject updates whose norm exceeds ``factor`` x a running median (Sun et al. 2019's
    norm-bounding defence, with the bound taken from the data instead of a fixed number).

    The median is over this round's candidate norms together with the norms accepted in
    the previous round, so it follows honest norms as they shrink during training or jump
    at a task switch, and a minority of hostile candidates cannot move it far. With one
    or two candidates and no history it is not robust (it cannot be).
    """

    def __init__(self, factor: float = 10.0, max_norm: float = 0.0) -> None:
        if factor < 0 or max_norm < 0:
            raise ValueError(f"norm bound factor/max_norm must be >= 0, got {factor}/{max_norm}")
        self.factor, self.max_norm = factor, max_norm
        self.previous: list[float] = []  # norms accepted in the last round with any

    def limit(self, candidates: Sequence[float]) -> float | None:
        """The bound for this round's candidates (None: no bound applies)."""
        bounds = [self.max_norm] if self.max_norm > 0 else []
        pool = [*self.previous, *candidates]
        if self.factor > 0 and pool:
            ref = statistics.median(pool)
            if ref > 0:
                bounds.append(self.factor * ref)
        return min(bounds) if bounds else None

    def record(self, accepted: Sequence[float]) -> None:
        if accepted:
            self.previous = list(accepted)


def _judge(
    msg: Message,
    sent: Collection[int],
    seen: set[int],
    phase: str,
    limits: ReplyLimits,
) -> tuple[int, str | None, dict[str, int | float]]:
    """Checks 1-3 of the module docstring: (node, reason or None, checked metrics)."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        seen.add(node)
        return node, error_text(msg), {}
    if node not in sent:
        return node, f"reply from node {node}, which was not sent a message ({phase})", {}
    if node in seen:
        return node, "duplicate reply: this node already replied this round", {}
    seen.add(node)
    try:
        check_records(msg, arrays=phase == "train")
    except ReplyError as exc:
        return node, str(exc), {}
    metrics, problem = check_metrics(phase, dict(msg.content["metrics"]), limits.examples_cap(node))
    return node, problem, metrics


def validate_replies(
    replies: Sequence[Message],
    sent: Collection[int],
    decode: Callable[[Message], Decoded],
    spec: ModelSpec,
    previous: Mapping[str, torch.Tensor],
    limits: ReplyLimits,
    norms: NormBound | None = None,
    metrics_check: Callable[[int, dict[str, int | float]], str | None] | None = None,
    screened: Callable[[Message], Screened | None] | None = None,
) -> tuple[list[ClientUpdate], list[Verdict]]:
    """Check every train reply: (accepted updates, one Verdict per reply in order).

    `sent`: the nodes sent a train message this round; `decode`: payload -> (values,
    mask), raising CodecError/ReplyError; `previous`: the global model sent (for norms);
    `metrics_check`: (node, checked metrics) -> why refused or None, after check 3.
    `screened`: a reply's `screen` done earlier (raising what `decode` raised), or None
    to decode it now; the checks and their order are the same either way.
    """
    verdicts: list[Verdict | None] = []
    candidates: list[tuple[int, ClientUpdate, float]] = []  # (reply index, update, norm)
    seen: set[int] = set()
    for i, msg in enumerate(replies):
        node, reason, metrics = _judge(msg, sent, seen, "train", limits)
        if reason is None and metrics_check is not None:
            reason = metrics_check(node, metrics)
        update, early = None, None
        if reason is None:
            try:
                early = None if screened is None else screened(msg)
                values, mask = decode(msg) if early is None else (early.values, early.mask)
                update = ClientUpdate(node, values, mask, int(metrics[WEIGHT_KEY]), metrics)
                reason = check_update(update, spec, None if early is None else early.clean)
            except (CodecError, ReplyError) as exc:
                reason = f"payload: {exc}"
        if reason is not None or update is None:
            verdicts.append(Verdict(node, False, reason or "rejected"))
            continue
        verdicts.append(None)  # decided after the norm check
        norm = None if early is None else early.norm
        candidates.append((i, update, update_norm(update, previous) if norm is None else norm))
    limit = None if norms is None else norms.limit([c[2] for c in candidates])
    accepted: list[ClientUpdate] = []
    for i, update, norm in candidates:
        if limit is not None and norm > limit:
            verdicts[i] = Verdict(
                update.node_id, False, f"update norm {norm:.4g} exceeds bound {limit:.4g}"
            )
        else:
            verdicts[i] = Verdict(update.node_id, True, None, update.metrics)
            accepted.append(update)
    if norms is not None:
        norms.record([n for i, _, n in candidates if verdicts[i].accepted])  # type: ignore[union-attr]
    return accepted, [v for v in verdicts if v is not None]


def validate_evaluate_replies(
    replies: Sequence[Message], sent: Collection[int], limits: ReplyLimits
) -> list[Verdict]:
    """Check every evaluate reply (checks 1-3): one Verdict per reply, in order."""
    seen: set[int] = set()
    out: list[Verdict] = []
    for msg in replies:
        node, reason, metrics = _judge(msg, sent, seen, "evaluate", limits)
        out.append(Verdict(node, reason is None, reason, metrics if reason is None else {}))
    return out
