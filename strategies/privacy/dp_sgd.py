"""Record-level DP-SGD on a sparse model: per-example clipping, Gaussian noise on kept weights.

Abadi et al. 2016: for a Poisson-sampled batch, each example's gradient g_i is clipped to L2
norm C, the clipped gradients are summed, Gaussian noise N(0, (z C)^2) is added, and the sum
is divided by the EXPECTED batch size. Per-example gradients come from ``torch.func``
(``vmap(grad(...))`` over ``functional_call``), not hand-written hooks.

Sparse: a pruned weight is held at 0 and never updated, so its gradient neither counts toward
g_i's norm nor receives noise: noise is added only where the mask keeps a weight (tensors
without a mask entry, e.g. biases, are kept everywhere). Noise on pruned entries would be
thrown away by the mask anyway, and adding it to zeros would densify the model.
Models with BatchNorm (cross-example statistics) are not supported by DP-SGD. A model's
``fixed_features(x)`` (a parameter-free per-example prefix) runs once per batch, outside vmap;
its ``forward(f, precomputed=True)`` then takes those features.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from strategies.privacy.accountant import PrivacyError

__all__ = ["per_example_grads", "poisson_batch", "privatize"]

_CHUNK = 1 << 18  # numbers squared per call in privatize (1 MiB of float32: fits in L2)


def poisson_batch(n: int, expected_batch: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson subsample: each of ``n`` examples kept with q = expected / n."""
    if n < 1 or expected_batch < 1:
        raise PrivacyError(
            f"Poisson sampling needs n >= 1 and batch >= 1, got {n}, {expected_batch}"
        )
    q = min(1.0, expected_batch / n)
    return (torch.rand(n, generator=generator) < q).nonzero().squeeze(1)  # [B], B ~ Bin(n, q)


def per_example_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Cross-entropy gradient of every trainable parameter, per example: {name: [B, *shape]}."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise PrivacyError(
                f"DP-SGD cannot train {type(m).__name__}: batch statistics mix examples; "
                "use GroupNorm/LayerNorm"
            )
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    kwargs: dict[str, bool] = {}
    prefix = getattr(model, "fixed_features", None)
    if callable(prefix):
        # a parameter-free, per-example prefix (e.g. tasks.scattering's ScatterNet): the same
        # function of each example whether run batched or per example, so it runs once per
        # batch outside vmap and only the trainable rest is differentiated per example
        with torch.no_grad():
            x = prefix(x)
        kwargs = {"precomputed": True}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),), kwargs)  # [1, classes]
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_ex = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")
    return dict(per_ex(params, x, y))


def privatize(
    per_example: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size],
    mask: Mapping[str, torch.Tensor] | None,
    clip: float,
    noise_multiplier: float,
    expected_batch: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """(sum_i clip_C(g_i * m) + N(0, (z C)^2) * m) / expected_batch, per parameter.

    ``per_example``: {name: [B, *shape]} (B may be 0: the result is noise only), this step's
    scratch: its masked names are zeroed in place off the mask;
    ``shapes``: every parameter's shape (for B = 0); ``mask``: bool per sparsified name.
    """
    if not clip > 0 or not noise_multiplier >= 0 or expected_batch < 1:
        raise PrivacyError(
            f"need clip > 0, noise >= 0, expected batch >= 1; got {clip}, {noise_multiplier}, "
            f"{expected_batch}"
        )
    # Bit-for-bit the formula above, without a B-times-larger temporary per step: masked
    # per-example tensors are masked in place (multiplying by 1 changes nothing, so unmasked
    # names are left alone), and the squares go through one reused buffer (x * x == x.pow(2)).
    keep = {n: mask[n].float() for n in shapes if mask is not None and n in mask}
    masked = dict(per_example)
    for n, g in masked.items():
        if n in keep:
            g.mul_(keep[n].to(g.dtype))  # [B, *shape]
    batch = next(iter(masked.values())).shape[0] if masked else 0
    if batch:
        sq = torch.zeros(batch)
        for g in masked.values():
            flat = g.reshape(batch, -1)  # [B, P]
            # Rows of at most ~_CHUNK numbers at a time through one small, cache-resident
            # buffer: a row's sum is the same whichever rows share the call.
            rows = max(1, _CHUNK // max(1, flat.shape[1]))
            scratch = torch.empty(min(rows, batch) * flat.shape[1])
            part = []
            for r in range(0, batch, rows):
                block = flat[r : r + rows]
                squares = scratch[: block.numel()].view(block.shape)
                part.append(torch.mul(block, block, out=squares).sum(dim=1))
            sq += torch.cat(part)
        factor = (clip / (sq.sqrt() + 1e-12)).clamp(max=1.0)  # [B]
    out: dict[str, torch.Tensor] = {}
    for n, shape in shapes.items():
        total = (
            torch.einsum("b,b...->...", factor, masked[n])
            if batch and n in masked
            else torch.zeros(shape)
        )
        noise = torch.randn(shape, generator=generator) * (noise_multiplier * clip)
        if n in keep:
            noise = noise * keep[n]  # noise only on the weights the mask keeps
        out[n] = (total + noise) / expected_batch
    return out
