"""FLOPs of a (simulated) sparse model, per layer, forward and backward, via forward hooks.

Counting convention (as in RigL, Evci et al. 2020, Appendix H):
- a weight op costs 2 * MACs FLOPs dense and 2 * MACs * d with d its weight's mask density
  (only the active weights would be multiplied by a sparse kernel);
- backward = 2 x forward (gradient w.r.t. the input and w.r.t. the weight);
- at RigL update steps the weight gradient is computed DENSE, costing f_D instead of f_S for
  that part: ``train_flops(..., dense_grad_steps=k)`` adds k * batch_size * (f_D - f_S);
- attention's QK^T and AV products are activation-activation matmuls: dense, unscaled;
- recurrent layers (nn.RNN/GRU/LSTM): per token, layer and direction, gates x (in x h + h x h)
  MACs (gates: RNN 1, GRU 3, LSTM 4; LSTM projections add h x proj), each part scaled by the
  density of its own weight (weight_ih_l*, weight_hh_l*);
- Embedding lookups are counted as known layers with 0 multiply-adds (a lookup); biases,
  norms, activations, softmax and GNN message aggregation are not counted (memory ops or
  lower order);
- any other module that owns a >= 2-D parameter (an unknown layer type, e.g. a custom kernel
  or GAT's attention vectors) is reported in ``FlopsReport.uncounted`` and makes
  ``strict=True`` raise: an unknown layer is never silently counted as 0.
Inputs may be any structure the model takes: a tensor, a tuple of positional arguments, a
dict of keyword arguments, or one object (e.g. a PyG ``Batch``); the batch size is
``example_input.shape[0]``, a PyG batch's ``num_graphs``, the first tensor's first dim, or
``batch_size=`` when given.
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
from strategies.sparse.selection import is_pyg_linear

__all__ = [
    "FlopsError",
    "FlopsReport",
    "flops_report",
    "inference_flops",
    "layer_flops",
    "train_flops",
]


@dataclass
class _Layer:
    weight_fwd: float = 0.0  # 2 * MACs * density, summed over calls
    dense_weight_fwd: float = 0.0  # 2 * MACs
    act_fwd: float = 0.0  # activation-activation matmuls (attention), never sparse
    params: int = 0
    active_params: int = 0


class FlopsError(ValueError):
    """The FLOP counter met a layer it does not know (``strict=True``) or a bad input."""


@dataclass
class FlopsReport:
    """Per-layer counts of one forward pass, the batch size, and the layers NOT counted."""

    layers: dict[str, _Layer]
    batch: int
    uncounted: list[str]


def _density(mask: Mapping[str, torch.Tensor] | None, key: str, rows: slice | None = None) -> float:
    if mask is None or key not in mask:
        return 1.0
    m = mask[key] if rows is None else mask[key][rows]
    return float(m.sum()) / m.numel() if m.numel() else 1.0


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _is_counted(mod: nn.Module) -> bool:
    return isinstance(
        mod,
        nn.Linear
        | nn.Conv1d
        | nn.Conv2d
        | nn.Conv3d
        | nn.Embedding
        | nn.MultiheadAttention
        | nn.RNNBase,
    ) or is_pyg_linear(mod) or _is_gat(mod)


def _is_gat(mod: nn.Module) -> bool:
    # PyG GATConv/GATv2Conv-style attention vectors att_src/att_dst [1, heads, C] (duck-typed).
    return isinstance(getattr(mod, "att_src", None), nn.Parameter) and isinstance(
        getattr(mod, "att_dst", None), nn.Parameter
    )


def _owns_kernel(mod: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in mod.parameters(recurse=False))


_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "GRU": 3, "LSTM": 4}


def _rnn_flops(
    mod: nn.RNNBase, name: str, args: tuple[Any, ...], mask: Mapping[str, torch.Tensor] | None
) -> tuple[float, float]:
    x = args[0]
    if isinstance(x, nn.utils.rnn.PackedSequence):
        tokens = int(x.data.shape[0])  # sum of the sequence lengths
    elif x.dim() == 2:  # unbatched [T, in]
        tokens = int(x.shape[0])
    else:  # [B, T, in] or [T, B, in]
        tokens = int(x.shape[0] * x.shape[1])
    gates = _GATES[mod.mode]
    h = mod.hidden_size
    out = mod.proj_size if mod.proj_size > 0 else h  # what feeds back / up the stack
    dirs = 2 if mod.bidirectional else 1
    p = _prefix(name)
    weight = dense = 0.0
    for layer in range(mod.num_layers):
        inp = mod.input_size if layer == 0 else out * dirs
        for suffix in ("", "_reverse")[:dirs]:
            parts = [  # (MACs per token, weight key)
                (gates * h * inp, f"weight_ih_l{layer}{suffix}"),
                (gates * h * out, f"weight_hh_l{layer}{suffix}"),
            ]
            if mod.proj_size > 0:
                parts.append((h * out, f"weight_hr_l{layer}{suffix}"))
            for macs, key in parts:
                weight += 2.0 * macs * tokens * _density(mask, p + key)
                dense += 2.0 * macs * tokens
    return weight, dense


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


def _batch_size(example_input: Any, batch_size: int | None) -> int:
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FlopsError(f"batch_size must be an int >= 1, got {batch_size!r}")
        return batch_size
    graphs = getattr(example_input, "num_graphs", None)  # a PyG Batch
    if isinstance(graphs, int) and graphs >= 1:
        return graphs
    first = example_input
    if isinstance(example_input, tuple | list):
        first = next((t for t in example_input if isinstance(t, torch.Tensor)), None)
    elif isinstance(example_input, dict):
        first = next((t for t in example_input.values() if isinstance(t, torch.Tensor)), None)
    if isinstance(first, torch.Tensor) and first.dim() >= 1 and first.shape[0] >= 1:
        return int(first.shape[0])
    raise FlopsError(
        "cannot tell the batch size of example_input: pass a batch [B, ...] with B >= 1, or "
        "batch_size="
    )


def _call(model: nn.Module, example_input: Any) -> None:
    if isinstance(example_input, tuple):
        model(*example_input)
    elif isinstance(example_input, dict):
        model(**example_input)
    else:
        model(example_input)


def _collect(
    model: nn.Module, example_input: Any, mask: Mask | None, batch_size: int | None = None
) -> FlopsReport:
    batch = _batch_size(example_input, batch_size)
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
            if _is_gat(m) and not isinstance(m, nn.Linear):
                # per node and head: <x_i, att_src> and <x_i, att_dst>, C MACs each; the
                # linear map is the child ``lin`` (counted there), messages are aggregation.
                y = out[0] if isinstance(out, tuple) else out
                heads, channels = getattr(m, "heads"), getattr(m, "out_channels")  # noqa: B009
                macs = 2 * int(y.shape[0]) * int(heads) * int(channels)
                layer.weight_fwd += 2.0 * macs
                layer.dense_weight_fwd += 2.0 * macs
                return
            if isinstance(m, nn.RNNBase):
                w, dw = _rnn_flops(m, name, args, mask)
                layer.weight_fwd += w
                layer.dense_weight_fwd += dw
                return
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
    uncounted: list[str] = []
    for name, mod in model.named_modules():
        if not _is_counted(mod):
            if _owns_kernel(mod):
                uncounted.append(name or type(mod).__name__)
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
            _call(model, example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return FlopsReport(layers, batch, uncounted)


def flops_report(
    model: nn.Module,
    example_input: Any,
    mask: Mask | None = None,
    *,
    batch_size: int | None = None,
    strict: bool = False,
) -> FlopsReport:
    """One forward pass with counting hooks; ``strict`` raises if any layer is uncounted."""
    report = _collect(model, example_input, mask, batch_size)
    if strict and report.uncounted:
        raise FlopsError(f"FLOPs of these modules are not counted: {report.uncounted}")
    return report


def layer_flops(
    model: nn.Module,
    example_input: Any,
    mask: Mask | None = None,
    *,
    batch_size: int | None = None,
    strict: bool = False,
) -> dict[str, dict[str, int]]:
    """Per layer ``{"forward", "backward", "params", "active_params"}`` for ONE example.

    FLOPs are divided by the batch size (exact for a batch of 1).
    """
    report = flops_report(model, example_input, mask, batch_size=batch_size, strict=strict)
    layers, batch = report.layers, report.batch
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


def inference_flops(
    model: nn.Module,
    example_input: Any,
    mask: Mask | None,
    *,
    batch_size: int | None = None,
    strict: bool = False,
) -> int:
    """Forward FLOPs of one example."""
    return sum(
        v["forward"]
        for v in layer_flops(
            model, example_input, mask, batch_size=batch_size, strict=strict
        ).values()
    )


def train_flops(
    model: nn.Module,
    example_input: Any,
    mask: Mask | None,
    num_examples_seen: int,
    *,
    dense_grad_steps: int = 0,
    batch_size: int = 1,
    example_batch_size: int | None = None,
    strict: bool = False,
) -> int:
    """Training FLOPs: 3 f_S per example seen, plus (f_D - f_S) per example at dense-grad steps.

    f_S / f_D: sparse / dense forward FLOPs of one example. At RigL update steps the weight
    gradient (1 x forward) is dense, so a step costs 2 f_S + f_D per example instead of 3 f_S.
    ``batch_size`` is the TRAINING batch size; ``example_batch_size`` the size of
    ``example_input`` when it cannot be inferred.
    """
    if num_examples_seen < 0 or dense_grad_steps < 0 or batch_size < 1:
        raise ValueError(
            "num_examples_seen and dense_grad_steps must be >= 0 and batch_size >= 1, got "
            f"{num_examples_seen}, {dense_grad_steps}, {batch_size}"
        )
    report = flops_report(model, example_input, mask, batch_size=example_batch_size, strict=strict)
    layers, batch = report.layers, report.batch
    f_s = sum(v.weight_fwd + v.act_fwd for v in layers.values()) / batch
    extra = sum(v.dense_weight_fwd - v.weight_fwd for v in layers.values()) / batch
    return round(3 * f_s * num_examples_seen + dense_grad_steps * batch_size * extra)
