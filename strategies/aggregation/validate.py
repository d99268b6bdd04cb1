"""Validate client replies before merging: keys, shapes, dtypes, finiteness, density, payload.

A bad client never raises out of here and is never averaged in: each reply is either
accepted as a ClientUpdate or rejected with a (node_id, reason) naming what was wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from flwr.app import Message

from strategies.aggregation.merge import ClientUpdate
from strategies.codec import CodecError
from strategies.sparse.masks import Mask


@dataclass(frozen=True)
class ModelSpec:
    """What an acceptable update looks like (taken from the current global model)."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    mask_keys: frozenset[str]  # the sparsified keys; each must carry a mask entry
    max_density: float = 1.0  # overall density bound over the masked tensors
    tolerance: float = 0.0

    @classmethod
    def from_state(
        cls,
        state: dict[str, torch.Tensor],
        mask: Mask,
        max_density: float = 1.0,
        tolerance: float = 0.0,
    ) -> ModelSpec:
        return cls(
            shapes={k: tuple(v.shape) for k, v in state.items()},
            dtypes={k: v.dtype for k, v in state.items()},
            mask_keys=frozenset(mask),
            max_density=max_density,
            tolerance=tolerance,
        )


def check_update(update: ClientUpdate, spec: ModelSpec) -> str | None:
    """The reason `update` is unacceptable, or None when it is fine."""
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
    for key, t in update.values.items():
        if tuple(t.shape) != spec.shapes[key]:
            return f"{key!r}: shape {tuple(t.shape)}, expected {spec.shapes[key]}"
        if t.dtype != spec.dtypes[key]:
            return f"{key!r}: dtype {t.dtype}, expected {spec.dtypes[key]}"
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            return f"{key!r}: contains NaN or Inf"
    active, total = 0, 0
    for key, m in update.mask.items():
        if m.dtype != torch.bool or tuple(m.shape) != spec.shapes[key]:
            return f"{key!r}: mask must be bool {spec.shapes[key]}, got {m.dtype} {tuple(m.shape)}"
        if bool((update.values[key][~m] != 0).any()):
            return f"{key!r}: nonzero values outside the mask"
        active += int(m.sum())
        total += m.numel()
    density = active / total if total else 0.0
    if density > spec.max_density + spec.tolerance + 1e-12:
        return (
            f"mask density {density:.4f} exceeds bound {spec.max_density:.4f} "
            f"+ tolerance {spec.tolerance:.4f}"
        )
    return None


def validate_replies(
    replies: Iterable[Message],
    spec: ModelSpec,
    decode: Callable[[Message], ClientUpdate],
) -> tuple[list[ClientUpdate], list[tuple[int, str]]]:
    """Decode and check every reply: (accepted updates, [(node_id, reason), ...])."""
    accepted: list[ClientUpdate] = []
    rejected: list[tuple[int, str]] = []
    seen: set[int] = set()
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        if msg.has_error():
            rejected.append((node, f"error reply (code {msg.error.code}): {msg.error.reason}"))
            continue
        if node in seen:
            rejected.append((node, "duplicate reply from the same node in one round"))
            continue
        try:
            update = decode(msg)
        except CodecError as exc:
            rejected.append((node, f"payload integrity: {exc}"))
            continue
        except Exception as exc:  # any malformed reply is the client's fault, not ours
            rejected.append((node, f"malformed reply: {type(exc).__name__}: {exc}"))
            continue
        reason = check_update(update, spec)
        if reason is not None:
            rejected.append((node, reason))
            continue
        seen.add(node)
        accepted.append(update)
    return accepted, rejected
