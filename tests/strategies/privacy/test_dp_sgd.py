import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from strategies.privacy.accountant import PrivacyError
from strategies.privacy.dp_sgd import per_example_grads, poisson_batch, privatize


def tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_per_example_grads_equal_one_by_one_backward() -> None:
    model = tiny()
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    per_ex = per_example_grads(model, x, y)
    for i in range(6):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            assert p.grad is not None
            assert torch.allclose(per_ex[n][i], p.grad, atol=1e-6), (n, i)


def test_privatize_without_noise_is_the_clipped_masked_sum() -> None:
    model = tiny()
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    per_ex = per_example_grads(model, x, y)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    mask = {"0.weight": torch.rand(5, 4) < 0.5, "2.weight": torch.rand(3, 5) < 0.5}
    clip = 0.1
    out = privatize(per_ex, shapes, mask, clip, 0.0, 8, torch.Generator().manual_seed(0))
    expected = {n: torch.zeros(s) for n, s in shapes.items()}
    for i in range(5):
        g = {n: per_ex[n][i] * (mask.get(n, 1)) for n in shapes}
        norm = math.sqrt(sum(float(v.pow(2).sum()) for v in g.values()))
        assert norm > clip  # every example is clipped here
        for n in shapes:
            expected[n] += g[n] * (clip / norm)
    for n in shapes:
        assert torch.allclose(out[n], expected[n] / 8, atol=1e-6)
        if n in mask:
            assert torch.all(out[n][~mask[n]] == 0)


def test_noise_only_on_kept_weights_with_the_right_scale() -> None:
    shapes = {"w": torch.Size([200, 50]), "b": torch.Size([200])}
    mask = {"w": torch.zeros(200, 50, dtype=torch.bool)}
    mask["w"][:, :10] = True  # 2,000 kept entries
    out = privatize({}, shapes, mask, 2.0, 1.5, 4, torch.Generator().manual_seed(1))
    assert torch.all(out["w"][~mask["w"]] == 0)  # zeros stay exactly zero: still sparse
    kept = out["w"][mask["w"]]
    assert abs(float(kept.std()) - 1.5 * 2.0 / 4) < 0.05  # z C / B
    assert float(out["b"].abs().min()) > 0  # dense tensors (biases) are kept everywhere


def test_poisson_batch_rate_and_errors() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = [int(poisson_batch(1000, 50, g).numel()) for _ in range(200)]
    assert abs(sum(sizes) / len(sizes) - 50) < 2
    with pytest.raises(PrivacyError):
        poisson_batch(0, 5, g)


def test_batchnorm_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(PrivacyError, match="BatchNorm1d"):
        per_example_grads(model, torch.randn(3, 4), torch.tensor([0, 1, 2]))
