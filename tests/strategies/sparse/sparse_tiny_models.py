"""Tiny models with every supported layer type, shared by the sparse tests."""

import torch
from torch import nn
from torch_geometric.nn import GCNConv

T = 6  # tokens (= graph nodes) per example


class Tiny(nn.Module):
    """Embedding -> Conv1d -> Conv2d -> MHA -> GCN -> Linear on [B, T] token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv1d = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2d = nn.Conv2d(1, 2, 3, padding=1)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.gcn = GCNConv(8, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8 + 2, 3)
        src = torch.arange(T - 1)
        # chain graph over the T tokens, both directions: [2, 2 (T - 1)]
        self.register_buffer(
            "edges", torch.stack([torch.cat([src, src + 1]), torch.cat([src + 1, src])])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.emb(x)  # [B, T, 8]
        h = self.conv1d(h.transpose(1, 2)).transpose(1, 2).relu()  # [B, T, 8]
        img = self.conv2d(h.unsqueeze(1)).relu().mean(dim=(2, 3))  # [B, 2]
        a, _ = self.mha(h, h, h)  # [B, T, 8]
        edges = self.get_buffer("edges")  # [2, 2 (T - 1)]
        offs = (torch.arange(b) * T).repeat_interleave(edges.shape[1])
        ei = edges.repeat(1, b) + offs  # [2, B * 2 (T - 1)]
        g = self.gcn(a.reshape(b * T, 8), ei).relu().reshape(b, T, 8)
        pooled = self.norm(g).mean(dim=1)  # [B, 8]
        return self.fc(torch.cat([pooled, img], dim=1))  # [B, 3]


SPARSE_KEYS = [
    "emb.weight",
    "conv1d.weight",
    "conv2d.weight",
    "mha.in_proj_weight",
    "mha.out_proj.weight",
    "gcn.lin.weight",
    "fc.weight",
]


def batch(seed: int, b: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 12, (b, T), generator=g), torch.randint(0, 3, (b,), generator=g)
