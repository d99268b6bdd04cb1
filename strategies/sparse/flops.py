"""FLOPs of a (simulated) sparse model, per layer, forward and backward, via forward hooks.

Counting convention (as in RigL, Evci et al. 2020, Appendix H):
- a weight op costs 2 * MACs FLOPs dense and 2 * MACs * d with d its weight's mask density
  (only the active weights would be multiplied by a sparse kernel);
- backward = 2 x forward (gradient w.r.t. the input and w.r.t. the weight);
- at RigL update steps the weight gradient is computed DENSE, costing f_D instead of f_S for
  that part: ``train_flops(..., dense_grad_steps=k)`` adds k * batch_size * (f_D - f_S);
- attention's QK^T and AV products are activation-activation matmuls: dense, unscaled;
- Embedding lookups, biases, norms, activations, softmax and GNN message aggregation are not
  counted (memory ops or lower order).
Layers hooked: nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, nn.MultiheadAttention (its
in_proj/q,k,v and out_proj weights are used functionally, so they are counted inside the MHA
hook), and any module named ``Linear`` with ``in_channels``/``out_channels`` (PyG's
``torch_geometric.nn.dense.Linear``, e.g. ``GCNConv.lin``; duck-typed because this package
never imports torch_geometric). These are FLOP counts only: masked dense kernels give no
wall-clock speedup and none is ever reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from strategies.sparse.masks import Mask

__all__ = ["inference_flops", "layer_flops", "train_flops"]


@dataclass
class _Layer:
    weight_fwd: float = 0.0  # 2 * MACs * density, summed over calls
    dense_weight_fwd: float = 0.0  # 2 * MACs
    act_fwd: float = 0.0  # activation-activation matmuls (attention), never sparse
    params: int = 0
    active_params: int = 0


def _density(mask: Mapping[str, torch.Tensor] | None, key: str, rows: slice | None = None) -> float:
    if mask is None or key not in mask:
        return 1.0
    m = mask[key] if rows is None else mask[key][rows]
    return float(m.sum()) / m.numel() if m.numel() else 1.0


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _is_pyg_linear(mod: nn.Module) -> bool:
    return (
        type(mod).__name__ == "Linear"
        and hasattr(mod, "in_channels")
        and hasattr(mod, "out_channels")
        and isinstance(getattr(mod, "weight", None), nn.Parameter)
    )


def _is_counted(mod: nn.Module) -> bool:
    return isinstance(
        mod, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Embedding | nn.MultiheadAttention
    ) or _is_pyg_linear(mod)


def _param_counts(
    mod: nn.Module, name: str, mask: Mapping[str, torch.Tensor] | None
) -> tuple[int, int]:
    recurse = isinstance(mod, nn.MultiheadAttention)  # out_proj is a child module
    total = active = 0
    for pname, p in mod.named_parameters(recurse=recurse):
        key = _prefix(name) + pname
        total += p.numel()
        if mask is not None and key in mask:
            active += int(mask[key].sum())
        else:
            active += p.numel()
    return total, active


def _mha_flops(
    mod: nn.MultiheadAttention,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    mask: Mapping[str, torch.Tensor] | None,
) -> tuple[float, float, float]:
    query = args[0] if len(args) > 0 else kwargs["query"]
    key = args[1] if len(args) > 1 else kwargs["key"]
    e = mod.embed_dim
    nl = query.numel() // e  # N * L query tokens
    ns = key.numel() // mod.kdim  # N * S key/value tokens
    # key: [N, S, kdim] (batch_first), [S, N, kdim], or unbatched [S, kdim]
    s = key.shape[1] if key.dim() == 3 and mod.batch_first else key.shape[0]
    p = _prefix(name)
    if mod._qkv_same_embed_dim:
        dq = _density(mask, p + "in_proj_weight", slice(0, e))
        dk = _density(mask, p + "in_proj_weight", slice(e, 2 * e))
        dv = _density(mask, p + "in_proj_weight", slice(2 * e, 3 * e))
    else:
        dq = _density(mask, p + "q_proj_weight")
        dk = _density(mask, p + "k_proj_weight")
        dv = _density(mask, p + "v_proj_weight")
    do = _density(mask, p + "out_proj.weight")
    # MACs: q proj [NL, E] x [E, E]; k proj [NS, kdim] x [kdim, E]; v likewise; out proj.
    macs = [nl * e * e, ns * mod.kdim * e, ns * mod.vdim * e, nl * e * e]
    dens = [dq, dk, dv, do]
    weight = sum(2.0 * m * d for m, d in zip(macs, dens, strict=True))
    dense = sum(2.0 * m for m in macs)
    # QK^T: [N, H, L, hd] x [N, H, hd, S] and AV: [N, H, L, S] x [N, H, S, hd] -> N L S E each.
    act = 2.0 * 2 * nl * s * e
    return weight, dense, act


def _collect(
    model: nn.Module, example_input: torch.Tensor, mask: Mask | None
) -> tuple[dict[str, _Layer], int]:
    if example_input.dim() == 0 or example_input.shape[0] < 1:
        raise ValueError(
            f"example_input must be a batch [B, ...] with B >= 1, got {tuple(example_input.shape)}"
        )
    batch = int(example_input.shape[0])
    layers: dict[str, _Layer] = {}
    handles = []

    def make_hook(name: str, key: str) -> Any:
        # name: module name (state_dict prefix, "" for the root); key: the reported layer key
        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            layer = layers[key]
            p = _prefix(name)
            if isinstance(m, nn.MultiheadAttention):
                w, dw, act = _mha_flops(m, name, args, kwargs, mask)
                layer.weight_fwd += w
                layer.dense_weight_fwd += dw
                layer.act_fwd += act
                return
            if isinstance(m, nn.Embedding):
                return  # a lookup: no multiply-adds
            y = out[0] if isinstance(out, tuple) else out
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
                k = 1
                for ks in m.kernel_size:
                    k *= ks
                # each output element: (C_in / groups) * prod(kernel) MACs
                macs = y.numel() * (m.in_channels // m.groups) * k
            elif isinstance(m, nn.Linear):
                macs = y.numel() * m.in_features  # [*, out] outputs x in MACs each
            else:  # PyG Linear
                macs = y.numel() * int(getattr(m, "in_channels"))  # noqa: B009
            d = _density(mask, p + "weight")
            layer.weight_fwd += 2.0 * macs * d
            layer.dense_weight_fwd += 2.0 * macs

        return hook

    mha_prefixes = [
        _prefix(n) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
    ]
    for name, mod in model.named_modules():
        if not _is_counted(mod):
            continue
        if any(name.startswith(pre) for pre in mha_prefixes if pre and pre != _prefix(name)):
            continue  # MHA's out_proj: used functionally, counted by the MHA hook
        total, active = _param_counts(mod, name, mask)
        key = name or type(mod).__name__
        layers[key] = _Layer(params=total, active_params=active)
        handles.append(mod.register_forward_hook(make_hook(name, key), with_kwargs=True))
    was_training = model.training
    try:
        # eval() so BatchNorm stats and dropout are untouched; grad ENABLED so
        # nn.TransformerEncoderLayer's fused fast path (which bypasses the MHA module call) is
        # not taken.
        model.eval()
        with torch.enable_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return layers, batch


def layer_flops(
    model: nn.Module, example_input: torch.Tensor, mask: Mask | None = None
) -> dict[str, dict[str, int]]:
    """Per layer ``{"forward", "backward", "params", "active_params"}`` for ONE example.

    ``example_input`` is a batch [B, *input_shape]; FLOPs are divided by B (exact for B = 1).
    """
    layers, batch = _collect(model, example_input, mask)
    out: dict[str, dict[str, int]] = {}
    for name, layer in layers.items():
        fwd = round((layer.weight_fwd + layer.act_fwd) / batch)
        out[name] = {
            "forward": fwd,
            "backward": 2 * fwd,
            "params": layer.params,
            "active_params": layer.active_params,
        }
    return out


def inference_flops(model: nn.Module, example_input: torch.Tensor, mask: Mask | None) -> int:
    """Forward FLOPs of one example."""
    return sum(v["forward"] for v in layer_flops(model, example_input, mask).values())


def train_flops(
    model: nn.Module,
    example_input: torch.Tensor,
    mask: Mask | None,
    num_examples_seen: int,
    *,
    dense_grad_steps: int = 0,
    batch_size: int = 1,
) -> int:
    """Training FLOPs: 3 f_S per example seen, plus (f_D - f_S) per example at dense-grad steps.

    f_S / f_D: sparse / dense forward FLOPs of one example. At RigL update steps the weight
    gradient (1 x forward) is dense, so a step costs 2 f_S + f_D per example instead of 3 f_S.
    """
    if num_examples_seen < 0 or dense_grad_steps < 0 or batch_size < 1:
        raise ValueError(
            "num_examples_seen and dense_grad_steps must be >= 0 and batch_size >= 1, got "
            f"{num_examples_seen}, {dense_grad_steps}, {batch_size}"
        )
    layers, batch = _collect(model, example_input, mask)
    f_s = sum(v.weight_fwd + v.act_fwd for v in layers.values()) / batch
    extra = sum(v.dense_weight_fwd - v.weight_fwd for v in layers.values()) / batch
    return round(3 * f_s * num_examples_seen + dense_grad_steps * batch_size * extra)
