"""Binary masks keyed by state_dict names: build, apply, validate, measure and bit-pack them.

A mask is a ``dict[str, torch.Tensor]`` of bool tensors keyed by the same names as
``model.state_dict()``; ``True`` = active (trainable, sent on the wire), ``False`` = pruned
(held at exactly 0). Tensors without a mask entry (biases, norms, buffers) are dense. This is
the one mechanism that applies masks: weights are zeroed in place on the real parameters
(no parametrizations), so fused kernels such as ``nn.TransformerEncoderLayer``'s eval fast
path see the same masked tensors ("simulated sparsity": no wall-clock speedup is claimed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

Mask = dict[str, torch.Tensor]
Predicate = Callable[[str, torch.Tensor], bool]

__all__ = [
    "Mask",
    "MaskError",
    "Predicate",
    "active_count",
    "apply_mask",
    "apply_mask_to_state",
    "default_sparsifiable",
    "layer_densities",
    "mask_density",
    "mask_from_bytes",
    "mask_to_bytes",
    "named_parameters_by_state_key",
    "ones_mask",
    "pack_mask",
    "random_mask",
    "sparsifiable_shapes",
    "target_active_count",
    "unpack_mask",
    "validate_mask",
]


class MaskError(ValueError):
    """A mask does not fit the model: wrong keys, shape, dtype, density or byte length."""


def default_sparsifiable(name: str, tensor: torch.Tensor) -> bool:
    """True for weight matrices/kernels (dim >= 2) that are not normalisation parameters.

    Covers Linear / Conv1d / Conv2d / Embedding weights, ``nn.MultiheadAttention``'s
    ``in_proj_weight`` [3E, E] and ``out_proj.weight`` [E, E], and GNN ``lin.weight``
    (e.g. PyG ``GCNConv``). Biases and norm scales/shifts are 1-D so they stay dense, as in
    RigL (Evci et al. 2020). The name test only guards exotic >=2-D norm parameters.
    A coarse predicate for `sparsifiable_shapes` (fuzzing, benchmarks); which tensors a run
    masks, on the clients and the server alike, is `selection.select_sparsifiable`.
    """
    return tensor.dim() >= 2 and "norm" not in name.lower()


def named_parameters_by_state_key(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters keyed by their ``state_dict`` names (shared parameters under every name)."""
    return dict(model.named_parameters(remove_duplicate=False))


def sparsifiable_shapes(
    model: nn.Module, predicate: Predicate = default_sparsifiable
) -> dict[str, torch.Size]:
    """Shapes of the parameters (never buffers) selected by ``predicate``, in model order."""
    return {
        name: p.shape
        for name, p in named_parameters_by_state_key(model).items()
        if predicate(name, p.detach())
    }


def target_active_count(numel: int, density: float) -> int:
    """Active entries for a tensor of ``numel`` at ``density``: round(d * n), clamped to [1, n].

    At least one entry stays active so no layer is cut off completely.
    """
    return min(numel, max(1, round(density * numel)))


def random_mask(
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    densities: Mapping[str, float],
    generator: torch.Generator | None = None,
) -> Mask:
    """Uniformly random mask with exactly ``max(1, round(d * numel))`` active entries per key."""
    missing = sorted(set(shapes) - set(densities))
    if missing:
        raise MaskError(f"no density given for: {missing}")
    mask: Mask = {}
    for name, shape in shapes.items():
        d = float(densities[name])
        if not 0.0 <= d <= 1.0 or math.isnan(d):
            raise MaskError(f"{name}: density {d} outside [0, 1]")
        numel = math.prod(shape)
        if numel == 0:
            raise MaskError(f"{name}: empty tensor of shape {tuple(shape)}")
        k = target_active_count(numel, d)
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=generator)[:k]] = True
        mask[name] = flat.view(tuple(shape))
    return mask


def ones_mask(shapes: Mapping[str, torch.Size | tuple[int, ...]]) -> Mask:
    """All-active mask (the dense rule): every entry kept."""
    return {name: torch.ones(tuple(shape), dtype=torch.bool) for name, shape in shapes.items()}


def apply_mask(model: nn.Module, mask: Mask) -> None:
    """Zero the pruned entries of the model's parameters in place (no autograd record)."""
    params = named_parameters_by_state_key(model)
    with torch.no_grad():
        for name, m in mask.items():
            if name not in params:
                raise MaskError(f"mask key {name!r} is not a parameter of the model")
            p = params[name]
            if m.shape != p.shape:
                raise MaskError(
                    f"{name}: mask shape {tuple(m.shape)} != parameter shape {tuple(p.shape)}"
                )
            p.masked_fill_(~m.to(device=p.device, dtype=torch.bool), 0.0)


def apply_mask_to_state(state: Mapping[str, torch.Tensor], mask: Mask) -> dict[str, torch.Tensor]:
    """New state dict with pruned entries zeroed; unmasked tensors are passed through as-is."""
    out: dict[str, torch.Tensor] = dict(state)
    for name, m in mask.items():
        if name not in state:
            raise MaskError(f"mask key {name!r} is not in the state dict")
        t = state[name]
        if m.shape != t.shape:
            raise MaskError(f"{name}: mask shape {tuple(m.shape)} != tensor shape {tuple(t.shape)}")
        out[name] = t.masked_fill(~m.to(device=t.device, dtype=torch.bool), 0)
    return out


def validate_mask(
    mask: Mask,
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    *,
    max_density: float | None = None,
    min_density: float | None = None,
) -> None:
    """Raise ``MaskError`` naming the key and problem unless ``mask`` fits ``shapes``.

    Checks: same key set, bool dtype, exact shape, at least one active entry per key, and the
    OVERALL density (active / total over all keys) within ``[min_density, max_density]``.
    Per-layer densities are not bounded: ERK legitimately gives small layers density 1.
    """
    if not isinstance(mask, Mapping):
        raise MaskError(f"mask must be a dict of bool tensors, got {type(mask).__name__}")
    missing = sorted(set(shapes) - set(mask))
    if missing:
        raise MaskError(f"mask is missing keys: {missing}")
    extra = sorted(set(mask) - set(shapes))
    if extra:
        raise MaskError(f"mask has unexpected keys: {extra}")
    for name, shape in shapes.items():
        m = mask[name]
        if not isinstance(m, torch.Tensor):
            raise MaskError(f"{name}: mask entry is {type(m).__name__}, not a tensor")
        if m.dtype != torch.bool:
            raise MaskError(f"{name}: mask dtype {m.dtype}, expected torch.bool")
        if tuple(m.shape) != tuple(shape):
            raise MaskError(f"{name}: mask shape {tuple(m.shape)} != expected {tuple(shape)}")
        if not bool(m.any()):
            raise MaskError(f"{name}: mask has no active entry")
    if not shapes or (max_density is None and min_density is None):
        return
    d = mask_density({k: mask[k] for k in shapes})
    if max_density is not None and d > max_density:
        raise MaskError(f"mask density {d:.6f} exceeds max_density {max_density:.6f}")
    if min_density is not None and d < min_density:
        raise MaskError(f"mask density {d:.6f} below min_density {min_density:.6f}")


def active_count(mask: Mask) -> int:
    """Number of active entries over all masked tensors."""
    return int(sum(int(m.sum()) for m in mask.values()))


def mask_density(mask: Mask) -> float:
    """Active / total entries over all masked tensors (1.0 for an empty mask)."""
    total = sum(m.numel() for m in mask.values())
    return 1.0 if total == 0 else active_count(mask) / total


def layer_densities(mask: Mask) -> dict[str, float]:
    """Density of each masked tensor."""
    return {name: int(m.sum()) / m.numel() for name, m in mask.items()}


def pack_mask(t: torch.Tensor) -> bytes:
    """Bit-pack a bool tensor (row-major, little bit order): ``ceil(numel / 8)`` bytes."""
    if t.dtype != torch.bool:
        raise MaskError(f"pack_mask needs a bool tensor, got {t.dtype}")
    flat = t.detach().cpu().reshape(-1).numpy()
    return np.packbits(flat, bitorder="little").tobytes()


def unpack_mask(data: bytes, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_mask``; raises ``MaskError`` if ``data`` has the wrong length."""
    numel = math.prod(shape)
    expected = (numel + 7) // 8
    if len(data) != expected:
        raise MaskError(
            f"packed mask of shape {tuple(shape)} needs {expected} bytes, got {len(data)}"
        )
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(np.bool_)).reshape(tuple(shape))


def mask_to_bytes(mask: Mask) -> dict[str, bytes]:
    """Bit-pack every entry of a mask."""
    return {name: pack_mask(m) for name, m in mask.items()}


def mask_from_bytes(
    d: Mapping[str, bytes], shapes: Mapping[str, torch.Size | tuple[int, ...]]
) -> Mask:
    """Unpack a ``mask_to_bytes`` dict; keys must match ``shapes`` exactly."""
    missing = sorted(set(shapes) - set(d))
    extra = sorted(set(d) - set(shapes))
    if missing or extra:
        raise MaskError(f"packed mask keys differ: missing {missing}, unexpected {extra}")
    out: Mask = {}
    for name, shape in shapes.items():
        try:
            out[name] = unpack_mask(d[name], shape)
        except MaskError as e:
            raise MaskError(f"{name}: {e}") from e
    return out


class OffMasks:
    """``~mask[name]`` per name, computed once per mask tensor and state.

    A training step masks gradients and weights with the complement of a mask that stays
    fixed for a whole round; on a small model the ``~`` costs as much as the masking. An
    entry is reused only for the very tensor it was computed from (held, so its identity
    cannot be reused) at the same in-place version: a mask replaced or changed in place
    gets a fresh complement. Callers must not modify what it returns.
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def __call__(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        hit = self._cache.get(name)
        if hit is not None and hit[0] is mask and hit[1] == mask._version:
            return hit[2]
        off = ~mask
        self._cache[name] = (mask, mask._version, off)
        return off
