"""Model zoo: the DST engine on models it was not written for, with SGD and Adam.

Each model trains a few RigL steps; after every step masked weights are exactly zero (also
through tied aliases), every unit keeps its active count, the per-unit densities are the
planned ones, and the dense FLOPs match a hand count within 5 %.
"""

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATConv, SAGEConv

from strategies.sparse.engine import DSTConfig, DSTController
from strategies.sparse.flops import FlopsError, flops_report, inference_flops
from strategies.sparse.layout import unit_rows
from strategies.sparse.masks import MaskError, target_active_count
from strategies.sparse.selection import select_sparsifiable

B, T = 2, 5  # batch, tokens


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # [B, T, 8]
        return self.head(out[:, -1])  # [B, 3]


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(6, 8, batch_first=True, bidirectional=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)  # [B, T, 16]
        return self.head(out[:, -1])


class ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.short = nn.Conv2d(1, 4, 1, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1, 8, 8]
        h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        h = F.relu(h + self.short(x))  # [B, 4, 8, 8]
        return self.fc(h.mean(dim=(2, 3)))


N_NODES = 6
EDGES = torch.tensor([[0, 1, 2, 3, 4, 5, 1, 2], [1, 2, 3, 4, 5, 0, 0, 1]])


class GATNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = GATConv(4, 8, heads=2)  # -> [N, 16]
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.head(F.elu(self.conv(x, edge_index)))  # [N, 3]


class SAGENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = SAGEConv(4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x, edge_index)))


class EncoderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 8]
        return self.head(self.layer(x).mean(dim=1))


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.out = nn.Linear(8, 10, bias=False)
        self.out.weight = self.emb.weight  # tied: one storage, two state_dict names

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T] ids
        return self.out(self.emb(x).mean(dim=1))  # [B, 10]


class WeightNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.utils.parametrizations.weight_norm(nn.Linear(6, 8))
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def _seq() -> tuple[Any, torch.Tensor]:
    return torch.randn(B, T, 6), torch.randint(0, 3, (B,))


def _graph() -> tuple[Any, torch.Tensor]:
    return (torch.randn(N_NODES, 4), EDGES), torch.randint(0, 3, (N_NODES,))


# name -> (factory, batch maker, hand-counted dense forward FLOPs per example, batch size)
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Any, torch.Tensor]], int]] = {
    # GRU: T * 2 * 3 gates * 8 * (6 + 8) + head 2 * 8 * 3
    "gru": (GRUNet, _seq, T * 2 * 3 * 8 * 14 + 48),
    # LSTM, 2 directions: 2 * T * 2 * 4 gates * 8 * (6 + 8) + head 2 * 16 * 3
    "lstm": (LSTMNet, _seq, 2 * T * 2 * 4 * 8 * 14 + 96),
    # conv1 64 px * 4 out * 9 MACs, conv2 64 * 4 * 36, shortcut 64 * 4 * 1, fc 4 * 3; x2
    "resnet-block-bn": (
        ResBlock,
        lambda: (torch.randn(B, 1, 8, 8), torch.randint(0, 3, (B,))),
        2 * (64 * 4 * 9 + 64 * 4 * 36 + 64 * 4 + 12),
    ),
    # per graph: lin 6 nodes * 4 * 16, attention 2 * 6 * 2 heads * 8, head 6 * 16 * 3; x2
    "gat": (GATNet, _graph, 2 * (6 * 4 * 16 + 2 * 6 * 2 * 8 + 6 * 16 * 3)),
    # lin_l + lin_r: 2 * 6 nodes * 4 * 8, head 6 * 8 * 3; x2
    "sage": (SAGENet, _graph, 2 * (2 * 6 * 4 * 8 + 6 * 8 * 3)),
    # q,k,v,out 4 * T * 8 * 8; QK^T + AV 2 * T * T * 8; FF T * 2 * 8 * 16; head 8 * 3; x2
    "transformer-encoder-layer": (
        EncoderNet,
        lambda: (torch.randn(B, T, 8), torch.randint(0, 3, (B,))),
        2 * (4 * T * 64 + 2 * T * T * 8 + T * 2 * 128 + 24),
    ),
    # tied output: 8 * 10 MACs (the lookup is 0)
    "tied-embedding": (
        TiedNet,
        lambda: (torch.randint(0, 10, (B, T)), torch.randint(0, 10, (B,))),
        2 * 80,
    ),
}


def _units(c: DSTController) -> dict[str, tuple[int, int]]:
    out = {}
    for n, m in c.mask.items():
        parts = c.slices.get(n, 1)
        for i, rows in enumerate(unit_rows(n, m.shape, parts)):
            out[n if parts == 1 else f"{n}#{i}"] = (int(m[rows].sum()), m[rows].numel())
    return out


def _call(model: nn.Module, x: Any) -> torch.Tensor:
    return model(*x) if isinstance(x, tuple) else model(x)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_masks_stay_exact_under_rigl(name: str, opt_name: str) -> None:
    factory, make_batch, _ = ZOO[name]
    torch.manual_seed(0)
    model = factory()
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        if opt_name == "sgd"
        else torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-2)
    )
    cfg = DSTConfig(rule="rigl", density=0.4, update_interval=2, end_fraction=1.0)
    c = DSTController(model, opt, cfg, total_steps=6, generator=torch.Generator().manual_seed(0))
    planned = c.planned_densities(0.4)
    counts = _units(c)
    assert counts == {
        u: (target_active_count(size, planned[u]), size) for u, (_, size) in counts.items()
    }
    state_names = dict(model.named_parameters(remove_duplicate=False))
    grew = 0
    for _ in range(6):
        x, y = make_batch()
        opt.zero_grad()
        F.cross_entropy(_call(model, x), y).backward()
        c.after_backward()
        grew += c.step()["grown"]
        c.check_invariants()
        for alias, canonical in c.selection.aliases.items():  # tied names see the same zeros
            assert torch.all(state_names[alias].detach()[~c.mask[canonical]] == 0)
        assert _units(c) == counts  # active count of every unit kept
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert grew > 0  # RigL really moved connections


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_flops_match_hand_count(name: str) -> None:
    factory, make_batch, hand = ZOO[name]
    torch.manual_seed(0)
    model = factory()
    x, _ = make_batch()
    report = flops_report(model, x, strict=True)  # nothing uncounted in the zoo
    assert report.uncounted == []
    per_graph = 1 if name in ("gat", "sage") else None  # one graph = one example
    counted = inference_flops(model, x, None, batch_size=per_graph)
    assert abs(counted - hand) <= 0.05 * hand, (counted, hand)


def test_selection_skips_vectors_norms_and_embeddings_and_ties_once() -> None:
    assert sorted(select_sparsifiable(GATNet()).params) == ["conv.lin.weight", "head.weight"]
    enc = select_sparsifiable(EncoderNet())
    assert sorted(enc.params) == [
        "head.weight",
        "layer.linear1.weight",
        "layer.linear2.weight",
        "layer.self_attn.in_proj_weight",
        "layer.self_attn.out_proj.weight",
    ]
    assert enc.slices == {"layer.self_attn.in_proj_weight": 3}
    tied = select_sparsifiable(TiedNet())
    assert list(tied.params) == ["out.weight"]  # via the Linear; the embedding is not a kernel
    assert tied.aliases == {"emb.weight": "out.weight"}
    assert list(select_sparsifiable(TiedNet(), embeddings=True).params) == ["emb.weight"]
    assert select_sparsifiable(TiedNet(), embeddings=True).aliases == {"out.weight": "emb.weight"}


def test_weight_norm_is_refused_by_name_and_works_when_excluded() -> None:
    with pytest.raises(MaskError, match=r"fc1\.weight is parametrized"):
        select_sparsifiable(WeightNormNet())
    model = WeightNormNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    cfg = DSTConfig(rule="rigl", density=0.5, update_interval=1, exclude=("fc1",))
    c = DSTController(model, opt, cfg, total_steps=4)
    assert list(c.mask) == ["fc2.weight"]
    for _ in range(4):
        x, y = _seq()
        opt.zero_grad()
        F.cross_entropy(model(x[:, 0]), y).backward()
        c.after_backward()
        c.step()
        c.check_invariants()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())  # no NaN


def test_old_weight_norm_hook_is_refused() -> None:
    with pytest.warns(FutureWarning):
        lin = nn.utils.weight_norm(nn.Linear(4, 4))
    with pytest.raises(MaskError, match="weight_g/weight_v"):
        select_sparsifiable(nn.Sequential(lin))


def test_unknown_kernel_is_reported_and_strict_raises() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.w

    model = nn.Sequential(Custom(), nn.Linear(3, 2))
    report = flops_report(model, torch.randn(2, 4))
    assert report.uncounted == ["0"]
    with pytest.raises(FlopsError, match=r"not counted: \['0'\]"):
        flops_report(model, torch.randn(2, 4), strict=True)
