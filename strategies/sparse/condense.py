"""condense(model, mask): a physically smaller model with the masked model's outputs; expand back.

Two reductions (torch.ao.pruning's ``squash_mask`` taken one step further; SRigL, Lasby et
al. 2023, Sec. 4.4 for the fan-in layer):

1. Dead units. For every unit group the model declares (``units.UnitGroup``) a unit whose
   weight row is fully masked and whose shift tensors (bias, BN beta/mean) are 0 outputs
   exactly 0, so it is sliced out of the producer (dim 0), its per-unit tensors, and the
   consumers' input columns (dim 1): ``conv2 [32, 16, 3, 3] -> [7, 4, 3, 3]``. The Linear /
   Conv / BatchNorm / PyG Linear modules keep their class; only their tensors and size
   attributes change. Transformer encoders become ``condensed_transformer`` modules (same
   names): whole attention heads (q, k, v rows and ``out_proj`` columns) can go.
2. Sparse rows. A masked ``Linear`` of at least ``fanin_min_weights`` weights (default 0)
   whose busiest row keeps at most ``fanin_max_density`` (default 0.25) of its inputs becomes
   ``FanInLinear`` (the fewest stored weights; ``condense_for_speed`` raises both bars: on a
   2-core CPU at batch 1 the gather's fixed cost made it slower than a dense matmul on
   smaller or denser layers, e.g. 49 vs 11 us for [64, 28] at k=6, 38 vs 22 us for
   [128, 1568] at k=157, par at k=40; at batch 64 it never won): ``values [out, k]`` +
   ``index [out, k]`` (rows with fewer than k inputs are padded with weight 0),
   y = sum_k values * x[..., index] + bias.
   A constant fan-in mask (SRigL) needs no padding.

``expand(condensed, template)`` returns a full-shape state dict: condensed tensors scattered
back to their original rows/columns, everything removed taken from ``template`` (zeros if
none). The slicing record lives on the condensed model as ``leanfed_condensed``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from strategies.sparse.condensed_transformer import swap_encoders
from strategies.sparse.masks import Mask, apply_mask
from strategies.sparse.units import consumer_columns, dead_units, unit_groups, unit_row_index

__all__ = [
    "FanInLinear",
    "Slice",
    "condense",
    "condense_for_speed",
    "condensed_mask",
    "expand",
    "swappable_linears",
]

# Modules whose parent reads ``child.weight`` directly (fused kernels): never swap the child.
_NO_SWAP_PARENTS = (nn.TransformerEncoderLayer, nn.MultiheadAttention)


class FanInLinear(nn.Module):
    """Gather + dense product: y[..., o] = sum_j values[o, j] * x[..., index[o, j]] + bias[o]."""

    index: torch.Tensor

    def __init__(self, values: torch.Tensor, index: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if values.shape != index.shape or values.dim() != 2:
            raise ValueError(f"values {tuple(values.shape)} / index {tuple(index.shape)} differ")
        self.values = nn.Parameter(values.detach().clone())  # [out, k]
        self.register_buffer("index", index.detach().to(torch.long).clone())  # [out, k]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())  # [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, k = self.values.shape
        # index_select on the flat index is several times faster than x[..., index] in eager.
        g = x.index_select(-1, self.index.reshape(-1)).view(*x.shape[:-1], out, k)
        y = (g * self.values).sum(-1)  # [..., out, k] -> [..., out]
        return y if self.bias is None else y + self.bias


@dataclass(frozen=True)
class Slice:
    """Where a condensed tensor sits in the full one: kept rows (dim 0) and columns (dim 1)."""

    full_shape: tuple[int, ...]
    rows: torch.Tensor | None  # [rows_kept] long, None = all
    cols: torch.Tensor | None  # [cols_kept] long, None = all
    fanin: bool = False  # stored as ``<module>.values`` + ``<module>.index``


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    out.update(dict(model.named_buffers(remove_duplicate=False)))
    return out


def _set(root: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name)
    if attr in mod._parameters:
        old = mod._parameters[attr]
        grad = old.requires_grad if old is not None else True
        setattr(mod, attr, nn.Parameter(value, requires_grad=grad))
    else:
        setattr(mod, attr, value)


def _sync_sizes(root: nn.Module) -> None:
    # Keep size attributes in step with the sliced tensors (repr, export, re-init checks).
    for mod in root.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.modules.conv._ConvNd):
            mod.out_channels, mod.in_channels = (
                mod.weight.shape[0],
                mod.weight.shape[1] * mod.groups,
            )
        elif isinstance(mod, nn.modules.batchnorm._NormBase) and mod.running_mean is not None:
            mod.num_features = mod.running_mean.shape[0]
        elif isinstance(w, torch.Tensor) and w.dim() == 2 and hasattr(mod, "in_channels"):
            # torch_geometric.nn.Linear
            setattr(mod, "out_channels", int(w.shape[0]))  # noqa: B010
            setattr(mod, "in_channels", int(w.shape[1]))  # noqa: B010
        lin = getattr(mod, "lin", None)
        if lin is not None and hasattr(mod, "in_channels") and hasattr(lin, "in_channels"):
            mod.in_channels, mod.out_channels = lin.in_channels, lin.out_channels  # GCNConv


def _unit_slices(
    model: nn.Module, mask: Mask
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Kept-row and kept-column bool vectors per tensor name, from the declared unit groups."""
    tensors = _tensors(model)
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    for g in unit_groups(model):
        dead = dead_units(mask, g)
        if dead.numel() == 0:
            continue
        index = unit_row_index(g, tensors[g.producer].shape[0])  # [units, rows of a unit]
        for name in g.shift:  # removable only if the unit's output is exactly 0
            dead = dead & (tensors[name].detach().cpu() == 0)[index].all(1)
        if bool(dead.all()):  # keep one unit: zero-width layers are not supported by every op
            dead[0] = False
        keep = ~dead
        keep_rows = torch.zeros(index.numel(), dtype=torch.bool)
        keep_rows[index[keep].reshape(-1)] = True
        for name in (g.producer, *g.shift, *g.scale):
            rows[name] = keep_rows
        for c in g.consumers:
            width = tensors[c.weight].shape[1]
            col = cols.setdefault(c.weight, torch.ones(width, dtype=torch.bool))
            col[consumer_columns(c, keep.numel())[dead].reshape(-1)] = False
    return rows, cols


def swappable_linears(root: nn.Module) -> list[str]:
    """Names of Linear modules (torch or PyG) that may be replaced by another module: their
    parent calls them (``child(x)``) rather than reading ``child.weight`` in a fused kernel."""
    mods = dict(root.named_modules())
    out = []
    for name, mod in mods.items():
        linear = isinstance(mod, nn.Linear) or type(mod).__name__ == "Linear"
        parent = mods.get(name.rpartition(".")[0]) if name else None
        if name and linear and not isinstance(parent, _NO_SWAP_PARENTS):
            out.append(name)
    return out


def _fanin_candidates(
    root: nn.Module, mask: Mask, max_density: float, min_weights: int
) -> list[str]:
    out = []
    for mod_name in swappable_linears(root):
        m = mask.get(f"{mod_name}.weight")
        if m is None or m.dim() != 2 or m.numel() < min_weights:
            continue
        if int(m.sum(1).max()) <= max_density * m.shape[1]:
            out.append(f"{mod_name}.weight")
    return out


def condense(
    model: nn.Module,
    mask: Mask,
    *,
    fanin_max_density: float = 0.25,
    fanin_min_weights: int = 0,
) -> nn.Module:
    """A smaller copy of ``model`` computing the masked model's outputs (``model`` untouched)."""
    small = copy.deepcopy(model)
    apply_mask(small, mask)
    rows, cols = _unit_slices(small, mask)
    tensors = _tensors(small)
    record: dict[str, Slice] = {}
    new_mask: Mask = {k: v.detach().cpu().clone() for k, v in mask.items()}
    for name in sorted(set(rows) | set(cols)):
        t = tensors[name].detach()
        r = rows.get(name)
        c = cols.get(name)
        ri = None if r is None else r.nonzero().squeeze(1)
        ci = None if c is None else c.nonzero().squeeze(1)
        new = t if ri is None else t.index_select(0, ri.to(t.device))
        if ci is not None:
            new = new.index_select(1, ci.to(t.device))
        if name in new_mask:
            m = new_mask[name] if ri is None else new_mask[name].index_select(0, ri)
            new_mask[name] = m if ci is None else m.index_select(1, ci)
        record[name] = Slice(tuple(t.shape), ri, ci)
        _set(small, name, new.clone())
    _sync_sizes(small)
    for name in _fanin_candidates(small, new_mask, fanin_max_density, fanin_min_weights):
        mod_name = name.rpartition(".")[0]
        lin = small.get_submodule(mod_name)
        m = new_mask[name]  # [out, in]
        k = max(1, int(m.sum(1).max()))
        # Active columns first (stable), then padding columns whose values are forced to 0.
        order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :k]
        valid = m.gather(1, order)
        weight = lin.weight
        assert isinstance(weight, torch.Tensor)
        w = weight.detach()
        values = w.gather(1, order.to(w.device)) * valid.to(w.device)
        fan = FanInLinear(values, order.to(w.device), getattr(lin, "bias", None))
        parent_name, _, child = mod_name.rpartition(".")
        setattr(small.get_submodule(parent_name), child, fan)
        old = record.get(name, Slice(tuple(w.shape), None, None))
        record[name] = Slice(old.full_shape, old.rows, old.cols, fanin=True)
    swap_encoders(small)  # heads/MLP width may have shrunk: explicit-op encoder layers
    small.leanfed_condensed = record  # type: ignore[assignment]
    return small


def condense_for_speed(model: nn.Module, mask: Mask) -> nn.Module:
    """``condense`` tuned for CPU latency: gather layers only where they beat a dense matmul."""
    return condense(model, mask, fanin_max_density=0.03, fanin_min_weights=65536)


def condensed_mask(condensed: nn.Module, mask: Mask) -> Mask:
    """The mask sliced the way ``condense`` sliced the weights (for training the small net)."""
    record: dict[str, Slice] = getattr(condensed, "leanfed_condensed", {})
    out: Mask = {}
    for name, m in mask.items():
        s = record.get(name)
        if s is not None and s.fanin:
            continue  # a fan-in layer stores only active weights: no mask left
        m = m if s is None or s.rows is None else m.index_select(0, s.rows)
        out[name] = m if s is None or s.cols is None else m.index_select(1, s.cols)
    return out


def expand(
    condensed: nn.Module, template: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Full-shape state dict of a condensed model; removed entries come from ``template`` (or 0)."""
    record: dict[str, Slice] = getattr(condensed, "leanfed_condensed", {})
    state = condensed.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        prefix, _, attr = name.rpartition(".")
        full_name = (
            f"{prefix}.weight"
            if attr in ("values", "index") and f"{prefix}.weight" in record
            else name
        )
        if attr == "index" and full_name != name:
            continue
        s = record.get(full_name)
        if s is None:
            out[name] = t.clone()
            continue
        if s.fanin:  # [out, k] values + indices -> dense [out, in_kept]
            idx = state[f"{prefix}.index"]
            width = len(s.cols) if s.cols is not None else s.full_shape[1]
            t = torch.zeros(t.shape[0], width, dtype=t.dtype).scatter_add_(1, idx.cpu(), t.cpu())
        base = template[full_name] if template is not None and full_name in template else None
        full = (
            torch.zeros(s.full_shape, dtype=t.dtype)
            if base is None
            else base.detach().cpu().clone()
        )
        rows = s.rows if s.rows is not None else torch.arange(s.full_shape[0])
        if s.cols is None:
            full[rows] = t.cpu()
        else:
            full[rows.unsqueeze(1), s.cols.unsqueeze(0)] = t.cpu()
        out[full_name] = full
    return out
