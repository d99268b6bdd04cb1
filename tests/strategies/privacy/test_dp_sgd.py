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


def _reference_privatize(  # the straightforward formula, dense temporaries and all
    per_example: dict[str, torch.Tensor],
    shapes: dict[str, torch.Size],
    mask: dict[str, torch.Tensor],
    clip: float,
    z: float,
    expected_batch: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    keep = {n: (mask[n].float() if n in mask else torch.ones(s)) for n, s in shapes.items()}
    masked = {n: g * keep[n] for n, g in per_example.items()}
    batch = next(iter(masked.values())).shape[0] if masked else 0
    if batch:
        sq = torch.zeros(batch)
        for g in masked.values():
            sq += g.reshape(batch, -1).pow(2).sum(dim=1)
        factor = (clip / (sq.sqrt() + 1e-12)).clamp(max=1.0)
    out = {}
    for n, shape in shapes.items():
        total = (
            torch.einsum("b,b...->...", factor, masked[n])
            if batch and n in masked
            else torch.zeros(shape)
        )
        noise = torch.randn(shape, generator=generator) * (z * clip) * keep[n]
        out[n] = (total + noise) / expected_batch
    return out


@pytest.mark.parametrize("batch", [0, 1, 7])
def test_privatize_is_bit_for_bit_the_reference_formula(batch: int) -> None:
    """The in-place, buffer-reusing privatize changes no bit (same seed, same model)."""
    from tasks.models import MODEL_REGISTRY

    model = MODEL_REGISTRY.resolve("cnn")((1, 8, 8), 10, 0)  # conv + linear, as the bench
    torch.manual_seed(3)
    x, y = torch.randn(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    mask = {n: torch.rand(s) < 0.2 for n, s in shapes.items() if n.endswith("weight")}
    got_in = per_example_grads(model, x, y) if batch else {}
    ref_in = {n: g.clone() for n, g in got_in.items()}
    for clip in (1e-3, 10.0):  # every example clipped / none clipped
        ref = _reference_privatize(
            {n: g.clone() for n, g in ref_in.items()},
            shapes,
            mask,
            clip,
            1.3,
            4,
            torch.Generator().manual_seed(5),
        )
        got = privatize(
            {n: g.clone() for n, g in got_in.items()},
            shapes,
            mask,
            clip,
            1.3,
            4,
            torch.Generator().manual_seed(5),
        )
        assert set(got) == set(ref)
        for n in ref:
            assert got[n].dtype == ref[n].dtype
            assert torch.equal(got[n], ref[n]), n
            assert got[n].numpy().tobytes() == ref[n].numpy().tobytes(), n  # signed zeros too


def test_dp_sgd_step_on_the_tanh_cnn_uses_per_example_grads() -> None:
    from tasks.models import build_model

    model = build_model("cnn", (1, 8, 8), 3, seed=0, options={"activation": "tanh", "hidden": 4})
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    per_ex = per_example_grads(model, x, y)
    for i in range(3):  # each example's gradient is its own backward pass
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            assert p.grad is not None and torch.allclose(per_ex[n][i], p.grad, atol=1e-5), n
    shapes = {n: p.shape for n, p in model.named_parameters()}
    mask = {"fc1.weight": torch.rand(4, 128, generator=torch.Generator().manual_seed(1)) < 0.1}
    out = privatize(per_ex, shapes, mask, 1.0, 1.0, 3, torch.Generator().manual_seed(0))
    assert (out["fc1.weight"][~mask["fc1.weight"]] == 0).all()  # nothing off the mask
    assert (out["fc1.weight"][mask["fc1.weight"]] != 0).all()
