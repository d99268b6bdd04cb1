"""Condensed transformer encoder: torch encoder layers as explicit ops, so heads and width shrink.

``nn.MultiheadAttention`` and the fused ``torch._transformer_encoder_layer_fwd`` require
``in_proj_weight`` [3E, E] with ``E = num_heads * head_dim``; once whole heads are removed
(Michel et al. 2019) the projection is [3 h' d_h, E] and ``out_proj`` [E, h' d_h], which
neither accepts. ``condense`` therefore swaps every ``nn.TransformerEncoder`` /
``nn.TransformerEncoderLayer`` for the modules here: the same maths (pre- or post-norm, ReLU or
GELU, dropout in training) as explicit ops, with ``F.scaled_dot_product_attention`` over the
kept heads. Submodule and tensor names are unchanged (``layers.0.self_attn.in_proj_weight``,
``linear1``, ``norm2``...), so ``expand`` and masks keep working. At batch 1 on one CPU thread
these few ops also beat the fused kernel (measured: 90 vs 132 us for a 64-wide, 4-head layer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

__all__ = ["CondensedAttention", "CondensedEncoder", "CondensedEncoderLayer", "swap_encoders"]


class CondensedAttention(nn.Module):
    """Self-attention over ``heads`` kept heads: qkv = x W^T + b, [B, T, 3, h', d_h]."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.in_proj_weight is None or not mha.batch_first:
            raise ValueError("condense: only batch-first self-attention with a fused in_proj")
        self.head_dim = int(mha.head_dim)
        rows = int(mha.in_proj_weight.shape[0])
        if rows % (3 * self.head_dim):
            raise ValueError(f"condense: in_proj has {rows} rows, not 3 x heads x {mha.head_dim}")
        self.heads = rows // (3 * self.head_dim)
        self.in_proj_weight = mha.in_proj_weight  # [3 h' d_h, E]
        self.in_proj_bias = mha.in_proj_bias  # [3 h' d_h] or None
        self.out_proj = mha.out_proj  # Linear: [E, h' d_h]
        self.dropout = float(mha.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, e = x.shape
        return self.attend(x.reshape(b * t, e), b, t, attn_mask).view(b, t, e)

    def attend(
        self, x: torch.Tensor, b: int, t: int, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """[B*T, E] tokens of B sequences of length T -> [B*T, E] (2-D: plain addmm calls)."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B*T, 3 h' d_h]
        q, k, v = qkv.view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        o = o.transpose(1, 2).reshape(b * t, self.heads * self.head_dim)  # [B*T, h' d_h]
        # F.linear, not self.out_proj(...): a module call costs as much as the small matmul.
        return F.linear(o, self.out_proj.weight, self.out_proj.bias)


class CondensedEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (batch_first) as explicit ops; same names and maths."""

    def __init__(self, layer: nn.TransformerEncoderLayer) -> None:
        super().__init__()
        self.self_attn = CondensedAttention(layer.self_attn)
        self.linear1, self.linear2 = layer.linear1, layer.linear2
        self.norm1, self.norm2 = layer.norm1, layer.norm2
        self.dropout, self.dropout1, self.dropout2 = layer.dropout, layer.dropout1, layer.dropout2
        self.norm_first = bool(layer.norm_first)
        act = layer.activation
        self.activation: Callable[[torch.Tensor], torch.Tensor] = act

    def infer_pre_norm(
        self, x: torch.Tensor, b: int, t: int, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Eval, pre-norm, on [B*T, E]: the same maths as functional calls (no dropout, no
        module calls); at batch 1 the per-call overhead of ~10 small modules and 3-D matmul
        handling is most of a layer's time."""
        n1, n2 = self.norm1, self.norm2
        z = F.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps)
        x = x + self.self_attn.attend(z, b, t, attn_mask)
        z = F.layer_norm(x, n2.normalized_shape, n2.weight, n2.bias, n2.eps)
        h = self.activation(F.linear(z, self.linear1.weight, self.linear1.bias))
        return x + F.linear(h, self.linear2.weight, self.linear2.bias)

    def _sa(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        return self.dropout1(self.self_attn(x, attn_mask))

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training and self.norm_first:
            b, t, e = x.shape
            return self.infer_pre_norm(x.reshape(b * t, e), b, t, attn_mask).view(b, t, e)
        if self.norm_first:  # pre-norm (Xiong et al. 2020)
            x = x + self._sa(self.norm1(x), attn_mask)
            return x + self._ff(self.norm2(x))
        x = self.norm1(x + self._sa(x, attn_mask))
        return self.norm2(x + self._ff(x))


def _additive(
    mask: torch.Tensor | None, padding: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor | None:
    # MHA conventions: bool True = "may not attend"; float masks are added to the scores.
    # -> one float mask [B or 1, 1, T or 1, T] for scaled_dot_product_attention.
    out = None
    if mask is not None:
        m = (
            mask
            if mask.dtype != torch.bool
            else torch.zeros_like(mask, dtype=x.dtype).masked_fill(mask, float("-inf"))
        )
        out = m.view(1, 1, *m.shape[-2:]) if m.dim() == 2 else m.unsqueeze(1)
    if padding is not None:  # [B, T]
        pad = (
            padding
            if padding.dtype != torch.bool
            else torch.zeros_like(padding, dtype=x.dtype).masked_fill(padding, float("-inf"))
        )
        pad = pad.view(pad.shape[0], 1, 1, pad.shape[1])
        out = pad if out is None else out + pad
    return out


class CondensedEncoder(nn.Module):
    """``nn.TransformerEncoder`` over ``CondensedEncoderLayer`` s, then the optional final norm."""

    def __init__(self, encoder: nn.TransformerEncoder) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CondensedEncoderLayer(lay) for lay in encoder.layers)
        self.norm = encoder.norm

    def forward(
        self,
        src: torch.Tensor,
        mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool | None = None,
    ) -> torch.Tensor:
        if is_causal and mask is None:
            t = src.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool, device=src.device).triu(1)
        attn = (
            None
            if mask is None and src_key_padding_mask is None
            else _additive(mask, src_key_padding_mask, src)
        )
        x = src
        if not self.training and all(lay.norm_first for lay in self.layers):
            b, t, e = src.shape  # eval fast path: tokens stay [B*T, E] through every layer
            x = src.reshape(b * t, e)
            for layer in self.layers:
                x = layer.infer_pre_norm(x, b, t, attn)  # type: ignore[operator]
            x = x.view(b, t, e)
        else:
            for layer in self.layers:
                x = layer(x, attn)
        return x if self.norm is None else self.norm(x)


def swap_encoders(root: nn.Module) -> None:
    """Replace, in place, every batch-first ``nn.TransformerEncoder`` of ``root`` (and every
    batch-first ``nn.TransformerEncoderLayer`` outside one) by its condensed counterpart."""
    for kind, wrap in (
        (nn.TransformerEncoder, CondensedEncoder),
        (nn.TransformerEncoderLayer, CondensedEncoderLayer),
    ):
        for name, mod in list(root.named_modules()):
            if not name or not isinstance(mod, kind):
                continue
            layers = mod.layers if isinstance(mod, nn.TransformerEncoder) else [mod]
            if not all(lay.self_attn.batch_first for lay in layers):
                continue
            parent, _, child = name.rpartition(".")
            new = wrap(mod).train(mod.training)  # type: ignore[arg-type]
            setattr(root.get_submodule(parent), child, new)
