"""What a client securely sums for a sparse round, and how the server reads the sum back.

Sparse without leaking who kept what (issue 10): the PUBLIC consensus mask M (the one
the server sent) fixes the vector's length, so a reply's size says nothing about the
client's own mask m_i. With w_i = min(examples_i, W_max) (an integer weight) and
Delta_i = x_i - g (local minus received global; quantized to z_i, see `ring`):

  values   [|M|]      w_i * m_i * z_i          ring L_v = q + ceil(log2(n W_max)) (signed)
  weights  [|M|]      w_i * m_i                ring L_w = ceil(log2(n W_max + 1))
  votes    [N_mask]   m_i (0/1, every coordinate of the masked layers)   L_c = log2(n+1)
  stats    [3]        w_i, round(256 w_i min(loss_i, 64)), #clipped      62-bit ring

"weights" and "votes" travel only on mask rounds (the server re-votes M after them).
On other rounds clients train under M without pruning or regrowing, so m_i = 1 on M,
the weight of every coordinate is sum_i w_i (from "stats") and the vector is |M| + 3
long. The server learns only the sums: the mask-aware mean
  x_new[M] = g[M] + (sum_i w_i m_i z_i) / (s * sum_i w_i m_i)      (see `ring.scale`)
(= sum w m x / sum w m, within `ring.error_bound`), coordinates nobody kept keep g,
and the vote count sum_i m_i of every coordinate (an UNWEIGHTED vote: weighting the
votes outside M would cost log2(n W_max) instead of log2(n+1) bits per coordinate).
Coordinates outside M carry no values, so a coordinate voted into the new mask starts
from 0 (where RigL grows it) instead of the regrowing clients' mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from strategies.secure.crypto import SecAggError
from strategies.secure.ring import Layout, Segment, bits_for, quantize, scale, signed, to_ring

LOSS_CAP, LOSS_SCALE = 64.0, 256


def check_mask_shapes(mask: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every entry of a plan's public mask names a model tensor and has its shape."""
    for k, m in mask.items():
        if k not in shapes or tuple(m.shape) != shapes[k]:
            raise SecAggError(f"mask entry {k!r} does not match the model")


def on_mask_indices(
    mask: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], key: str
) -> np.ndarray:
    """Flat indices of `key` on the public mask (all of them for a dense entry)."""
    if key in mask:
        return mask[key].reshape(-1).nonzero().reshape(-1).numpy()
    return np.arange(int(np.prod(shapes[key], dtype=np.int64)))


@dataclass(frozen=True)
class SparseSumPlan:
    """The public plan of one round: shapes, the consensus mask, ring sizes, full or not."""

    shapes: dict[str, tuple[int, ...]]  # every floating-point entry of the model
    mask: dict[str, torch.Tensor]  # the consensus mask M (keys absent: dense)
    full: bool  # mask round: send per-coordinate weights and votes
    clip: float
    quant_bits: int
    max_weight: int
    num_clients: int

    def __post_init__(self) -> None:
        if self.max_weight < 1 or self.num_clients < 1:
            raise SecAggError("max weight and client count must be >= 1")
        check_mask_shapes(self.mask, self.shapes)

    @property
    def keys(self) -> list[str]:
        return sorted(self.shapes)

    def _on_mask(self, key: str) -> np.ndarray:
        return on_mask_indices(self.mask, self.shapes, key)

    def layout(self) -> Layout:
        n, w = self.num_clients, self.max_weight
        on_mask = sum(len(self._on_mask(k)) for k in self.keys)
        qmax = 2 ** (self.quant_bits - 1) - 1
        segs = [Segment("values", on_mask, bits_for(n * w * qmax, signed_values=True))]
        if self.full:
            voted = sum(self.mask[k].numel() for k in sorted(self.mask))
            segs.append(Segment("weights", on_mask, bits_for(n * w, signed_values=False)))
            segs.append(Segment("votes", voted, bits_for(n, signed_values=False)))
        segs.append(Segment("stats", 3, 62))
        return Layout(tuple(segs))

    # ------------------------------------------------------------------ client side
    def encode(
        self,
        received: dict[str, torch.Tensor],
        local: dict[str, torch.Tensor],
        local_mask: dict[str, torch.Tensor] | None,
        examples: int,
        loss: float,
    ) -> np.ndarray:
        """One client's plaintext vector (uint64 ring elements, layout order)."""
        w = max(1, min(int(examples), self.max_weight))
        vals, wts = [], []
        clipped = 0
        for k in self.keys:
            idx = self._on_mask(k)
            delta = (local[k].detach().double() - received[k].detach().double()).reshape(-1)
            keep = np.ones(len(idx), dtype=np.int64)
            if self.full and local_mask is not None and k in local_mask:
                keep = local_mask[k].reshape(-1).numpy()[idx].astype(np.int64)
            z, c = quantize(delta.numpy()[idx] * keep, self.clip, self.quant_bits)
            clipped += c
            vals.append(w * keep * z)
            wts.append(w * keep)
        parts = [to_ring(np.concatenate(vals) if vals else np.zeros(0, np.int64))]
        if self.full:
            parts.append(to_ring(np.concatenate(wts)))
            votes = [
                (local_mask[k] if local_mask and k in local_mask else self.mask[k])
                .reshape(-1)
                .numpy()
                .astype(np.int64)
                for k in sorted(self.mask)
            ]
            parts.append(to_ring(np.concatenate(votes) if votes else np.zeros(0, np.int64)))
        loss_q = round(w * min(max(float(loss), 0.0), LOSS_CAP) * LOSS_SCALE)
        parts.append(to_ring(np.array([w, loss_q, clipped], dtype=np.int64)))
        return np.concatenate(parts)

    # ------------------------------------------------------------------ server side
    def decode(self, total: np.ndarray, previous: dict[str, torch.Tensor]) -> SecureSum:
        """Read the unmasked sum: the mask-aware mean model, the votes and the stats."""
        layout = self.layout()
        segs = layout.split(total)
        bits = {s.name: s.bits for s in layout.segments}
        stats = segs["stats"].astype(np.int64)
        total_w = int(stats[0])
        s_values = signed(segs["values"], bits["values"]).astype(np.float64)
        weights = (
            segs["weights"].astype(np.float64)
            if self.full
            else np.full(len(s_values), float(total_w))
        )
        merged: dict[str, torch.Tensor] = {}
        at = 0
        unit = scale(self.clip, self.quant_bits)
        for k in self.keys:
            idx = self._on_mask(k)
            flat = previous[k].detach().double().reshape(-1).clone()
            s, wk = s_values[at : at + len(idx)], weights[at : at + len(idx)]
            mean = np.divide(s, unit * wk, out=np.zeros_like(s), where=wk > 0)
            flat[idx] = flat[idx] + torch.from_numpy(mean)  # nobody kept it: stays g
            merged[k] = flat.reshape(self.shapes[k]).to(previous[k].dtype)
            at += len(idx)
        votes: dict[str, torch.Tensor] = {}
        if self.full:
            at = 0
            for k in sorted(self.mask):
                n = self.mask[k].numel()
                v = segs["votes"][at : at + n].astype(np.int64)
                votes[k] = torch.from_numpy(v).reshape(self.mask[k].shape).double()
                at += n
        loss = stats[1] / LOSS_SCALE / total_w if total_w > 0 else float("nan")
        return SecureSum(merged, votes, total_w, float(loss), int(stats[2]))


@dataclass
class SecureSum:
    """What the server learns from one secure round: aggregates only."""

    values: dict[str, torch.Tensor]  # full-shape mask-aware mean (floating entries)
    votes: dict[str, torch.Tensor]  # per masked layer: number of clients keeping each entry
    total_weight: int  # sum_i w_i over the surviving clients
    train_loss: float  # weighted mean local loss (capped at LOSS_CAP)
    clipped: int  # coordinates clipped to [-clip, clip], summed over clients
    noised_unclipped: float | None = None  # distributed DP: noised count of ||Delta|| <= C
