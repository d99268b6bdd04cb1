import pytest
import torch
from sparse_tiny_models import T, Tiny
from torch import nn
from torch_geometric.nn import GCNConv

from strategies.sparse.flops import inference_flops, layer_flops, train_flops
from strategies.sparse.masks import ones_mask, random_mask, sparsifiable_shapes

HALF = {"weight": torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)}


def test_linear_exact() -> None:
    lin = nn.Linear(4, 3)
    x = torch.zeros(1, 4)
    assert layer_flops(lin, x) == {
        "Linear": {"forward": 24, "backward": 48, "params": 15, "active_params": 15}
    }
    assert layer_flops(lin, x, HALF)["Linear"] == {
        "forward": 12,
        "backward": 24,
        "params": 15,
        "active_params": 9,
    }
    assert inference_flops(lin, x, HALF) == 12
    # a batch of 5 is reported per example; tokens [1, 7, 4] count 7 rows
    assert inference_flops(lin, torch.zeros(5, 4), None) == 24
    assert inference_flops(lin, torch.zeros(1, 7, 4), None) == 7 * 24


def test_train_flops_with_dense_gradient_steps() -> None:
    lin = nn.Linear(4, 3)
    x = torch.zeros(1, 4)
    assert train_flops(lin, x, None, 10) == 10 * 72
    # sparse: 3 * 12 per example; 2 RigL steps of batch 5 add (24 - 12) each example
    assert train_flops(lin, x, HALF, 10, dense_grad_steps=2, batch_size=5) == 360 + 2 * 5 * 12
    with pytest.raises(ValueError, match="batch_size"):
        train_flops(lin, x, None, 10, batch_size=0)


def test_conv_exact() -> None:
    conv = nn.Conv2d(1, 2, 3)  # [1, 1, 5, 5] -> [1, 2, 3, 3]: 18 outputs x 9 MACs
    assert layer_flops(conv, torch.zeros(1, 1, 5, 5))["Conv2d"]["forward"] == 2 * 18 * 9
    mask = {"weight": torch.zeros(2, 1, 3, 3, dtype=torch.bool)}
    mask["weight"][0] = True  # density 0.5
    assert layer_flops(conv, torch.zeros(1, 1, 5, 5), mask)["Conv2d"]["forward"] == 18 * 9
    conv1 = nn.Conv1d(4, 6, 3, groups=2)  # [1, 4, 10] -> [1, 6, 8]: 48 outputs x 2 * 3 MACs
    assert layer_flops(conv1, torch.zeros(1, 4, 10))["Conv1d"]["forward"] == 2 * 48 * 6


def test_mha_exact_with_slice_densities() -> None:
    mha = nn.MultiheadAttention(4, 2, batch_first=True)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    x = torch.zeros(1, 3, 4)  # L = S = 3, E = 4
    proj = 3 * 4 * 4  # MACs of one projection
    attn = 2 * 3 * 3 * 4  # QK^T + AV MACs
    dense = layer_flops(Wrap(), x)["mha"]
    assert dense["forward"] == 2 * (4 * proj + attn)
    assert dense["params"] == 12 * 4 + 12 + 16 + 4
    mask = ones_mask(sparsifiable_shapes(Wrap()))
    mask["mha.in_proj_weight"][0:4] = False  # q projection fully off
    mask["mha.in_proj_weight"][0, 0] = True  # (keep one so it is valid)
    mask["mha.out_proj.weight"][:, :2] = False  # out projection at 0.5
    got = layer_flops(Wrap(), x, mask)["mha"]
    expected = 2 * (proj / 16 + 2 * proj + proj / 2 + attn)
    assert got["forward"] == round(expected)
    assert got["active_params"] == dense["params"] - 15 - 8


def test_embedding_counts_params_not_flops() -> None:
    emb = nn.Embedding(10, 4)
    mask = {"weight": torch.zeros(10, 4, dtype=torch.bool)}
    mask["weight"][:5] = True
    out = layer_flops(emb, torch.zeros(1, 3, dtype=torch.long), mask)["Embedding"]
    assert out == {"forward": 0, "backward": 0, "params": 40, "active_params": 20}


def test_gcn_lin_counted_per_node() -> None:
    class G(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gcn = GCNConv(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gcn(x, torch.tensor([[0, 1], [1, 0]]))

    out = layer_flops(G(), torch.zeros(2, 4))  # 2 nodes as a "batch" of 2
    assert out == {"gcn.lin": {"forward": 24, "backward": 48, "params": 12, "active_params": 12}}


def test_tiny_model_all_layers_and_density_scaling() -> None:
    model = Tiny()
    x = torch.zeros(1, T, dtype=torch.long)
    dense = layer_flops(model, x)
    assert set(dense) == {"emb", "conv1d", "conv2d", "mha", "gcn.lin", "fc"}
    assert dense["fc"]["forward"] == 2 * 10 * 3
    assert dense["gcn.lin"]["forward"] == 2 * T * 8 * 8
    assert dense["conv1d"]["forward"] == 2 * T * 8 * 8 * 3
    shapes = sparsifiable_shapes(model)
    mask = random_mask(shapes, {n: 0.5 for n in shapes}, torch.Generator().manual_seed(0))
    sparse = layer_flops(model, x, mask)
    assert sparse["fc"]["forward"] == 30
    assert sparse["mha"]["forward"] < dense["mha"]["forward"]
    assert model.training  # mode restored


def test_transformer_layer_counted_in_eval_and_mode_restored() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    layer.eval()
    out = layer_flops(layer, torch.zeros(1, 5, 8))
    assert out["self_attn"]["forward"] == 2 * (4 * 5 * 64 + 2 * 5 * 5 * 8)
    assert out["linear1"]["forward"] == 2 * 5 * 8 * 16
    assert not layer.training
