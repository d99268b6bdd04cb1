"""ScatterNet: the fixed scattering transform's known properties and the heads trained on it."""

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from strategies.plugins import PluginError
from strategies.privacy.dp_sgd import per_example_grads
from strategies.sparse.selection import select_sparsifiable
from tasks import scattering
from tasks.models import MODELS, build_model
from tasks.scattering import ScatterCNN, Scattering2d, ScatterLinear


def _blob(h: int = 28, w: int = 28) -> torch.Tensor:
    """[1, 1, h, w]: a random 12 x 12 pattern at rows/cols 6-17, zeros around (digit-like): a
    shift by 4 keeps it 6 pixels from the border, beyond the reflect padding's reach (4)."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 1, h, w)
    x[..., 6:18, 6:18] = torch.rand(12, 12, generator=g)
    return x


def test_output_shape_and_channel_count() -> None:
    s = Scattering2d((28, 28), j=2, orientations=8)
    assert s.channels_per_input == 1 + 2 * 8 + 8 * 8 * 1 == 81
    assert s(torch.rand(3, 1, 28, 28)).shape == (3, 81, 7, 7)
    assert s(torch.rand(2, 3, 28, 28)).shape == (2, 3 * 81, 7, 7)  # channel-major
    s1 = Scattering2d((8, 8), j=1, orientations=4)
    assert s1.channels_per_input == 5 and s1(torch.rand(1, 1, 8, 8)).shape == (1, 5, 4, 4)
    s3 = Scattering2d((16, 16), j=3, orientations=2)
    assert s3.channels_per_input == 1 + 6 + 4 * 3 == 19  # order 2: (j1, j2) in {01, 02, 12}
    assert list(s.parameters()) == [] and s.state_dict() == {}  # fixed, never on the wire


def test_filters_zero_mean_wavelets_and_unit_low_pass() -> None:
    s = Scattering2d((28, 28))
    assert s.psi_hat.shape == (16, 36, 36) and s.phi_hat.shape == (36, 36)
    assert s.psi_hat[:, 0, 0].abs().max() < 1e-5  # wavelets carry no mean
    assert s.phi_hat[0, 0].real == pytest.approx(1.0, abs=1e-5)  # phi averages


def test_constant_image_has_only_order_zero() -> None:
    out = Scattering2d((28, 28))(torch.full((1, 1, 28, 28), 0.5))  # [1, 81, 7, 7]
    assert torch.allclose(out[:, 0], torch.full((1, 7, 7), 0.5), atol=1e-5)
    assert out[:, 1:].abs().max() < 1e-4


def test_translation_by_two_to_the_j_shifts_the_output_by_one() -> None:
    s = Scattering2d((28, 28))
    x = _blob()
    shifted = torch.roll(x, shifts=(4, 4), dims=(2, 3))  # the blob stays inside, zeros around
    a, b = s(x), s(shifted)
    assert torch.allclose(b[..., 1:, 1:], a[..., :-1, :-1], atol=1e-5)
    # and it is not trivially equal unshifted
    assert (b - a).abs().max() > 1e-2


def test_small_translations_barely_change_the_scattering() -> None:
    s = Scattering2d((28, 28))
    x = _blob()
    moved = torch.roll(x, shifts=1, dims=3)
    dx = (moved - x).norm() / x.norm()
    ds = (s(moved) - s(x)).norm() / s(x).norm()
    assert dx > 0.5 and ds < 0.4 * dx  # local invariance (Mallat 2012): measured 0.17 vs 0.72


def test_errors_are_one_line() -> None:
    with pytest.raises(PluginError, match="at least 4 x 4"):
        Scattering2d((3, 3), j=2)
    with pytest.raises(PluginError, match="J <= 4"):
        Scattering2d((28, 28), j=5)
    with pytest.raises(PluginError, match="built for"):
        Scattering2d((28, 28))(torch.rand(1, 1, 8, 8))
    with pytest.raises(PluginError, match="groups must divide 81"):
        build_model("scatter-linear", (1, 28, 28), 10, options={"groups": 10})
    with pytest.raises(PluginError, match="image input_shape"):
        build_model("scatter-cnn", (30,), 10)


def test_heads_exact_sizes_and_only_the_head_is_sparsified() -> None:
    assert {"scatter-linear", "scatter-cnn"} <= set(MODELS)
    lin = build_model("scatter-linear", (1, 28, 28), 10)
    assert {k: tuple(v.shape) for k, v in lin.state_dict().items()} == {
        "fc.weight": (10, 81 * 7 * 7),
        "fc.bias": (10,),
    }
    cnn = build_model("scatter-cnn", (1, 28, 28), 10)
    assert {k: tuple(v.shape) for k, v in cnn.state_dict().items()} == {
        "conv.weight": (32, 81, 3, 3),
        "conv.bias": (32,),
        "fc.weight": (10, 32 * 3 * 3),  # 7 x 7 pooled to 3 x 3
        "fc.bias": (10,),
    }
    assert set(select_sparsifiable(lin).params) == {"fc.weight"}
    assert set(select_sparsifiable(cnn).params) == {"conv.weight", "fc.weight"}
    small = build_model("scatter-cnn", (1, 8, 8), 3, options={"width": 4, "activation": "relu"})
    assert small(torch.rand(2, 1, 8, 8)).shape == (2, 3)  # 2 x 2 maps pooled to 1 x 1
    assert isinstance(small, ScatterCNN) and small.fc.in_features == 4


def test_memoised_features_equal_the_computed_ones() -> None:
    model = build_model("scatter-linear", (1, 28, 28), 10)
    assert isinstance(model, ScatterLinear)
    scattering._MEMO.clear()
    x = torch.rand(5, 1, 28, 28)
    direct = model._compute(x)  # [5, 81, 7, 7]
    first = model.fixed_features(x)
    assert len(scattering._MEMO) == 5
    again = model.fixed_features(torch.cat([x[3:], torch.rand(1, 1, 28, 28)]))  # 2 hits, 1 miss
    assert len(scattering._MEMO) == 6
    assert torch.equal(first, direct) and torch.equal(again[:2], direct[3:])
    # bit-for-bit the same alone as in a batch, so memoised rows do not depend on batching
    assert torch.equal(model._compute(x[3:4]), direct[3:4])
    # GroupNorm per example: each image's 27 groups have mean 0 (no data statistics)
    assert direct.reshape(5, 27, -1).mean(-1).abs().max() < 1e-5
    assert torch.equal(model(x), model(first, precomputed=True))


@pytest.mark.parametrize("name", ["scatter-linear", "scatter-cnn"])
def test_per_example_grads_match_autograd_one_at_a_time(name: str) -> None:
    model = build_model(name, (1, 28, 28), 10)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 3, 9])
    grads = per_example_grads(model, x, y)  # {name: [4, *shape]}
    assert set(grads) == {k for k, _ in model.named_parameters()}
    for i in range(4):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for k, p in model.named_parameters():
            assert p.grad is not None
            assert torch.allclose(grads[k][i], p.grad, atol=1e-6), k
