"""SparseFedAvg's pure round maths: initial mask, reply bounds, checks on a rule's output."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from flwr.app import Message

from strategies import codec
from strategies.aggregation.validate import ModelSpec
from strategies.aggregation.wire import ReplyError, reply_payload
from strategies.sparse.density import DensityRule
from strategies.sparse.masks import Mask, random_mask
from strategies.sparse.structured import structured_init

__all__ = [
    "check_merged",
    "check_mask",
    "initial_mask",
    "masked",
    "reply_spec",
    "upload_bytes",
]


def initial_mask(  # noqa: PLR0913 - the strategy's mask knobs
    state: Mapping[str, torch.Tensor],
    keys: Iterable[str] | None,
    density: float,
    density_rule: DensityRule,
    seed: int,
    structure: Mapping[str, str],
    unit_rows: dict[str, torch.Tensor],
) -> Mask:
    """The seeded ERK/uniform random (or structured) mask over ``keys`` of ``state``.

    ``keys`` are the clients' DST selection (``strategies.sparse.selection.select_sparsifiable``
    for the run's config; ``tasks.structure.run_selection``), so the server masks exactly the
    tensors the clients' engines mask; there is no second definition of "sparsifiable" here.
    """
    if keys is None:
        raise ValueError(
            "SparseFedAvg needs sparse_keys or an initial_mask: the clients' DST selection "
            "(tasks.structure.run_selection)"
        )
    keys = list(keys)
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"sparse_keys not in the model: {missing}")
    shapes = {k: state[k].shape for k in keys}
    densities = {k: 1.0 for k in shapes} if density >= 1.0 else density_rule(shapes, density)
    gen = torch.Generator().manual_seed(seed)
    kinds = {k: structure.get(k, "none") for k in shapes}
    if any(v != "none" for v in kinds.values()):
        return structured_init(shapes, densities, kinds, gen, unit_rows=unit_rows)
    return random_mask(shapes, densities, generator=gen)


def masked(state: Mapping[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    """``state`` with everything off the mask zeroed (unmasked keys as they are)."""
    return {
        k: torch.where(mask[k], v, torch.zeros_like(v)) if k in mask else v
        for k, v in state.items()
    }


def reply_spec(  # noqa: PLR0913 - the strategy's bounds
    previous: dict[str, torch.Tensor],
    mask: Mask,
    density: float,
    max_density: float | None,
    tolerance: float,
    target_densities: Mapping[str, float],
    max_abs: float,
) -> ModelSpec:
    """Acceptable replies: the model's tensors; each layer at most its consensus density
    (or `max_density` if set higher), overall at most `max_density` (default: target)."""
    layers = {k: int(m.sum()) / max(1, m.numel()) for k, m in mask.items()}
    actual = sum(int(m.sum()) for m in mask.values()) / max(
        1, sum(m.numel() for m in mask.values())
    )
    bound = max_density if max_density is not None else max(density, actual)
    layer_bounds = {
        k: max(d, target_densities.get(k, d), max_density or 0.0) for k, d in layers.items()
    }
    return ModelSpec.from_state(previous, mask, bound, tolerance, layer_bounds, max_abs)


def upload_bytes(replies: Iterable[Message], limit: int) -> dict[int, int]:
    """node -> payload bytes received, every reply of a node counted (unreadable ones: 0)."""
    uploads: dict[int, int] = {}
    for msg in replies:
        try:
            size = len(reply_payload(msg, limit))
        except (ReplyError, codec.CodecError):
            continue
        node = int(msg.metadata.src_node_id)
        uploads[node] = uploads.get(node, 0) + size
    return uploads


def check_merged(
    merged: Mapping[str, torch.Tensor], previous: Mapping[str, torch.Tensor], rule: str
) -> None:
    """A merge rule must return every key of the model, each in its shape."""
    bad = [k for k in previous if k not in merged or merged[k].shape != previous[k].shape]
    if bad or set(merged) != set(previous):
        raise ValueError(f"merge rule {rule} returned bad keys/shapes: {bad}")


def check_mask(new: Mapping[str, torch.Tensor], mask: Mask, rule: str) -> Mask:
    """A proposed/voted mask: the same keys as ``mask``, bool tensors of the same shapes."""
    for k, m in mask.items():
        got = new.get(k)
        if got is None or got.dtype != torch.bool or got.shape != m.shape:
            raise ValueError(
                f"mask rule {rule}: entry {k!r} missing or not a bool "
                f"tensor of shape {tuple(m.shape)}"
            )
    if set(new) != set(mask):
        raise ValueError(f"mask rule {rule}: keys differ from the mask")
    return {k: new[k] for k in mask}
