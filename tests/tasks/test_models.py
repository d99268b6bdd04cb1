import copy
import pickle

import pytest
import torch

from tasks.gnn import grid_edge_index
from tasks.models import MODELS, ModelError, build_model, default_model_for

CASES = [
    ("cnn", (1, 28, 28)),
    ("cnn", (1, 8, 8)),
    ("transformer", (1, 28, 28)),
    ("transformer", (1, 8, 8)),
    ("transformer", (30,)),
    ("gnn", (1, 8, 8)),
    ("gnn", (1, 28, 28)),
    ("mlp", (30,)),
    ("mlp", (1, 8, 8)),
]


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_output_shape_and_grad(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, shape, num_classes=3, seed=0)
    x = torch.rand(5, *shape)
    out = model(x)
    assert out.shape == (5, 3) and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    assert model(x[:1]).shape == (1, 3)  # another batch size (GNN adjacency cache)


def test_seeded_init() -> None:
    for name in MODELS:
        shape = (30,) if name == "mlp" else (1, 8, 8)
        a = build_model(name, shape, 4, seed=1).state_dict()
        b = build_model(name, shape, 4, seed=1).state_dict()
        c = build_model(name, shape, 4, seed=2).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_gnn_graph_not_in_state_dict_and_copyable() -> None:
    model = build_model("gnn", (1, 8, 8), 10)
    assert not any("edge_index" in k or "coords" in k for k in model.state_dict())
    x = torch.rand(3, 1, 8, 8)
    out = model(x)  # fills the sparse adjacency cache
    clone = copy.deepcopy(model)
    assert torch.allclose(clone(x), out)
    assert torch.allclose(pickle.loads(pickle.dumps(model))(x), out)


def test_grid_edges_8_neighbour() -> None:
    ei = grid_edge_index(3, 3)
    # corners 3 neighbours, edges 5, centre 8: 4*3 + 4*5 + 8 = 40 directed edges
    assert ei.shape == (2, 40)
    assert torch.bincount(ei[0], minlength=9).tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]
    pairs = set(map(tuple, ei.t().tolist()))
    assert all((d, s) in pairs for s, d in pairs)  # undirected


def test_errors_and_defaults() -> None:
    with pytest.raises(ModelError, match="model = 'resnet': unknown model"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(ModelError, match=r"cnn: expected an image input_shape \(C, H, W\)"):
        build_model("cnn", (30,), 2)
    with pytest.raises(ModelError, match="num_classes must be >= 2"):
        build_model("mlp", (30,), 1)
    assert default_model_for("mnist5k") == "cnn"
    assert default_model_for("breast_cancer") == "mlp"
    assert default_model_for("csv:/x.csv") == "mlp"
    assert default_model_for("npz:/x.npz", (1, 28, 28)) == "cnn"


def test_cnn_tanh_and_hidden_options() -> None:
    relu = build_model("cnn", (1, 8, 8), 10, seed=0)
    small = build_model("cnn", (1, 8, 8), 10, seed=0, options={"activation": "tanh", "hidden": 6})
    assert tuple(small.fc1.weight.shape) == (6, 32 * 2 * 2)  # type: ignore[union-attr]
    assert tuple(small.fc2.weight.shape) == (10, 6)  # type: ignore[union-attr]
    x = torch.randn(3, 1, 8, 8)
    assert small(x).shape == (3, 10)
    tanh = build_model("cnn", (1, 8, 8), 10, seed=0, options={"activation": "tanh"})
    for (n, a), (_, b) in zip(tanh.state_dict().items(), relu.state_dict().items(), strict=True):
        assert torch.equal(a, b), n  # the same weights (seed) ...
    assert not torch.allclose(tanh(x), relu(x))  # ... through another activation
    with pytest.raises(ModelError, match="activation must be one of"):
        build_model("cnn", (1, 8, 8), 10, options={"activation": "gelu"})
    with pytest.raises(ModelError, match="hidden must be in"):
        build_model("cnn", (1, 8, 8), 10, options={"hidden": 0})
