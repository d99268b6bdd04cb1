"""Which parameters of a model DST may sparsify: known layer kernels only, one mask per storage.

By default only the weight matrices/kernels of layer types whose maths we know are masked
(as in RigL, Evci et al. 2020: biases, norms and embeddings stay dense):

- ``nn.Linear`` (and subclasses, e.g. ``nn.MultiheadAttention.out_proj``), PyG's ``Linear``
  (duck-typed: this package never imports torch_geometric; covers GCNConv/GATConv/SAGEConv's
  ``lin*``), ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``: ``weight``;
- ``nn.MultiheadAttention``: ``in_proj_weight`` (fused [3E, E]: three SLICES q, k, v, each
  gets its own density and its own prune/grow budget so q/k are not starved by v) or the
  separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``;
- ``nn.RNN``/``nn.GRU``/``nn.LSTM``: ``weight_ih_l*``/``weight_hh_l*`` (all directions);
- ``nn.Embedding``: only with ``embeddings=True`` (a lookup table is not a kernel).

Everything else (attention vectors such as GAT's ``att_src``, positional-embedding
parameters, norm scales, biases) stays dense. Tied/shared parameters (e.g. an embedding tied to
the output layer) appear under several state_dict names but are ONE storage: they get one
mask, under the first name, and the other names are reported as aliases. Parametrized weights
(``torch.nn.utils.parametrizations.weight_norm`` and friends, or the old ``weight_norm`` hook
with ``weight_g``/``weight_v``) are refused with an error naming the module: a mask on ``v``
would not zero the effective weight and can make ``||v|| = 0`` (NaN); exclude them by pattern.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from strategies.sparse.masks import MaskError, Predicate

__all__ = [
    "Selection",
    "apply_overrides",
    "is_pyg_linear",
    "matches_any",
    "parse_patterns",
    "predicate_selection",
    "select_sparsifiable",
    "slice_rows",
]

_CONV = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


@dataclass
class Selection:
    """The sparsifiable parameters of one model.

    ``params``: state_dict name -> parameter (first name of each storage);
    ``slices``: name -> number of equal row slices that are separate layers for densities and
    prune/grow (3 for a fused ``in_proj_weight``); ``aliases``: other state_dict name of a
    tied parameter -> the name its mask lives under.
    """

    params: dict[str, nn.Parameter] = field(default_factory=dict)
    slices: dict[str, int] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def shapes(self) -> dict[str, torch.Size]:
        """Shapes of the selected parameters, in model order."""
        return {n: p.shape for n, p in self.params.items()}


def is_pyg_linear(mod: nn.Module) -> bool:
    """A torch_geometric ``Linear`` (its own class, not a subclass of ``nn.Linear``)."""
    return (
        type(mod).__name__ == "Linear"
        and type(mod).__module__.startswith("torch_geometric")
        and isinstance(getattr(mod, "weight", None), nn.Parameter)
    )


def _kernel_names(mod: nn.Module, embeddings: bool) -> list[str]:
    """Local names of the kernels of ``mod`` (not recursing), [] for unknown types."""
    if isinstance(mod, (nn.Linear, *_CONV)) or is_pyg_linear(mod):
        return ["weight"]
    if isinstance(mod, nn.MultiheadAttention):
        if mod.in_proj_weight is not None:
            return ["in_proj_weight"]
        return ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    if isinstance(mod, nn.RNNBase):
        return [n for n in mod._flat_weights_names if n.startswith("weight_")]
    if isinstance(mod, nn.Embedding | nn.EmbeddingBag) and embeddings:
        return ["weight"]
    return []


def _refuse_parametrized(mod: nn.Module, name: str, local: str) -> None:
    full = f"{name}.{local}" if name else local
    if parametrize.is_parametrized(mod, local):
        raise MaskError(
            f"{full} is parametrized ({type(mod).__name__} with torch.nn.utils.parametrize, "
            "e.g. weight_norm): leanfed masks plain weights only; exclude it with "
            f"dst.exclude = {name!r} or remove the parametrization"
        )
    if hasattr(mod, f"{local}_g") and hasattr(mod, f"{local}_v"):
        raise MaskError(
            f"{full} uses the weight_norm hook ({local}_g/{local}_v): leanfed masks plain "
            f"weights only; exclude it with dst.exclude = {name!r}"
        )


def parse_patterns(text: str | Iterable[str]) -> tuple[str, ...]:
    """Comma-separated fnmatch patterns (run-config style) -> tuple; empty items dropped."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(p.strip() for p in items if p.strip())


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True if the state_dict ``name`` or its module prefix matches one fnmatch pattern."""
    module = name.rsplit(".", 1)[0] if "." in name else ""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module, p) for p in patterns)


def select_sparsifiable(
    model: nn.Module,
    *,
    exclude: Iterable[str] = (),
    embeddings: bool = False,
) -> Selection:
    """The kernels DST may mask (see the module docstring); ``exclude``: fnmatch patterns.

    Raises ``MaskError`` for a parametrized kernel that is not excluded.
    """
    patterns = tuple(exclude)
    sel = Selection()
    seen: dict[int, str] = {}  # id(parameter) -> canonical name
    for name, mod in model.named_modules(remove_duplicate=False):
        for local in _kernel_names(mod, embeddings):
            full = f"{name}.{local}" if name else local
            if matches_any(full, patterns):
                continue
            _refuse_parametrized(mod, name, local)
            p = mod._parameters.get(local)
            if not isinstance(p, nn.Parameter) or p.dim() < 2:
                continue  # lazy/uninitialised or absent (e.g. bias-only variants)
            if id(p) in seen:
                if full != seen[id(p)]:
                    sel.aliases[full] = seen[id(p)]
                continue
            seen[id(p)] = full
            sel.params[full] = p
            if local == "in_proj_weight":
                sel.slices[full] = 3
    # Tied parameters reached through a module of an unknown type (or the same module under
    # two names) are aliases too: every state_dict name of a selected storage is mapped.
    for full, p in model.named_parameters(remove_duplicate=False):
        canonical = seen.get(id(p))
        if canonical is not None and full != canonical:
            sel.aliases[full] = canonical
    return sel


def slice_rows(name: str, shape: torch.Size | tuple[int, ...], parts: int) -> list[slice]:
    """Row slices of a fused tensor split into ``parts`` equal layers (dim 0)."""
    rows = int(shape[0])
    if parts < 1 or rows % parts:
        raise MaskError(f"{name}: {rows} rows do not split into {parts} equal slices")
    step = rows // parts
    return [slice(i * step, (i + 1) * step) for i in range(parts)]


def apply_overrides(
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    density: float,
    overrides: Mapping[str, float],
) -> tuple[dict[str, float], float]:
    """Fix the density of layers matching an override pattern; return (fixed, rest density).

    The fixed layers' active entries come out of the overall budget ``density * N``; the
    returned rest density spreads what is left over the other layers (for the layer-density
    rule). Raises ``MaskError`` if the fixed layers alone exceed the budget or leave the rest
    at a density above 1.
    """
    fixed: dict[str, float] = {}
    for name in shapes:
        for pattern, d in overrides.items():
            if matches_any(name, (pattern,)):
                if not 0.0 < d <= 1.0:
                    raise MaskError(f"density override {pattern!r}={d} outside (0, 1]")
                fixed[name] = float(d)
                break
    numel = {n: int(torch.Size(s).numel()) for n, s in shapes.items()}
    total = sum(numel.values())
    rest_n = sum(n for k, n in numel.items() if k not in fixed)
    budget = density * total - sum(fixed[k] * numel[k] for k in fixed)
    if rest_n == 0:
        return fixed, density
    rest = budget / rest_n
    if not 0.0 < rest <= 1.0:
        raise MaskError(
            f"density overrides {dict(overrides)} leave density {rest:.4f} for the other layers "
            f"at overall density {density}: must be in (0, 1]"
        )
    return fixed, rest


def predicate_selection(model: nn.Module, predicate: Predicate) -> Selection:
    """Legacy selection: every parameter name the predicate accepts (first name per storage)."""
    sel = Selection()
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            if seen[id(p)] in sel.params:
                sel.aliases[name] = seen[id(p)]
            continue
        seen[id(p)] = name
        if predicate(name, p.detach()):
            sel.params[name] = p
            if name.endswith("in_proj_weight") and p.shape[0] % 3 == 0:
                sel.slices[name] = 3
    return sel
