"""The four execution variants of ``leanfed bench speed`` and how one is timed.

dense: the dense-trained model. masked: the structured-DST model with zeros in dense kernels
("simulated sparsity"). csr: the masked model with every swappable masked Linear stored as
``torch.sparse`` CSR (convolutions and fused attention/MLP blocks stay dense: PyTorch has no
CSR convolution and the fused transformer kernels read dense weights). condensed:
``strategies.sparse.condense.condense_for_speed`` (smaller dense layers, whole attention
heads removed, gather fan-in layers only where they beat a dense matmul).
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils import benchmark

from strategies.sparse.condense import (
    condense_for_speed,
    condensed_mask,
    swappable_linears,
)
from strategies.sparse.masks import Mask, apply_mask

__all__ = ["CSRLinear", "latencies", "to_csr", "train_round_s", "variants"]


class CSRLinear(nn.Module):
    """y = W_csr @ x + b with W in torch.sparse CSR ([out, in], only active entries stored)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        with warnings.catch_warnings():  # "sparse CSR support is in beta": known
            warnings.simplefilter("ignore", UserWarning)
            self.weight = weight.detach().to_sparse_csr()
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, in]
        y = torch.sparse.mm(self.weight, flat.t()).t()  # [N, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def to_csr(model: nn.Module, mask: Mask) -> nn.Module:
    """Copy of the masked ``model`` with its swappable masked Linear layers as CSRLinear."""
    out = copy.deepcopy(model)
    apply_mask(out, mask)
    for name in swappable_linears(out):
        if f"{name}.weight" not in mask:
            continue
        lin = out.get_submodule(name)
        parent, _, child = name.rpartition(".")
        bias = getattr(lin, "bias", None)
        weight = lin.weight
        assert isinstance(weight, torch.Tensor)
        setattr(out.get_submodule(parent), child, CSRLinear(weight, bias))
    return out


def variants(dense: nn.Module, sparse: nn.Module, mask: Mask) -> dict[str, nn.Module]:
    """The four models to compare: eval-mode inference copies without gradients (a parameter
    that requires grad costs a few us more per op even under ``inference_mode``, which at
    batch 1 is a visible share of a small layer; every variant gets the same treatment)."""
    models = {
        "dense": copy.deepcopy(dense),
        "masked": copy.deepcopy(sparse),
        "csr": to_csr(sparse, mask),
        "condensed": condense_for_speed(sparse, mask),
    }
    return {k: m.eval().requires_grad_(False) for k, m in models.items()}


def latencies(
    models: dict[str, nn.Module], x: torch.Tensor, threads: int, blocks: int, block_s: float
) -> dict[str, tuple[float, float, float]]:
    """Per model: (median ms, IQR ms, CPU ms of the calling thread) of one forward pass.

    The models are timed INTERLEAVED: ``blocks`` rounds, each running every model for about
    ``block_s`` seconds (``torch.utils.benchmark.Timer.timeit``), so load from other jobs on
    a shared machine hits every model alike; median and IQR are over the blocks. With one
    thread the forward runs on the calling thread, so its CPU time (``time.thread_time``) is
    a load-independent cost; with more threads it misses the pool threads' share.
    """
    timers = {}
    number = {}
    with torch.inference_mode():
        for name, model in models.items():
            model(x)  # warm-up: caches (GNN adjacency), allocator, kernel selection
            t = benchmark.Timer(
                stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads
            )
            once = t.timeit(1).median
            timers[name], number[name] = t, max(1, int(block_s / max(once, 1e-6)))
        wall: dict[str, list[float]] = {n: [] for n in models}
        cpu: dict[str, list[float]] = {n: [] for n in models}
        for _ in range(blocks):
            for name, t in timers.items():
                c0 = time.thread_time()
                wall[name].append(t.timeit(number[name]).median)
                cpu[name].append((time.thread_time() - c0) / number[name])
    out = {}
    for name in models:
        q = statistics.quantiles(wall[name], n=4) if blocks > 1 else [wall[name][0]] * 3
        out[name] = (
            1e3 * statistics.median(wall[name]),
            1e3 * (q[2] - q[0]),
            1e3 * statistics.median(cpu[name]),
        )
    return out


def _round(
    model: nn.Module,
    step: Callable[[], None],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch: int,
    opt: torch.optim.Optimizer,
) -> float:
    gen = torch.Generator().manual_seed(0)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        step()
    return time.perf_counter() - t0


def train_round_s(
    variant: str,
    model: nn.Module,
    mask: Mask | None,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    batch: int,
    repeats: int = 3,
) -> float | None:
    """Median wall seconds of one local round (``steps`` SGD steps) in this variant.

    dense: plain steps. masked: steps with masked gradients and re-masking (the DST client's
    work without topology updates, which are rare). condensed: plain steps on the condensed
    net, re-masking only its remaining masked tensors. csr: None (PyTorch autograd has no
    CSR-weight gradient for ``sparse.mm`` on CPU).
    """
    if variant == "csr":
        return None
    net = copy.deepcopy(model)
    m: Mask = {}
    if variant == "masked" and mask is not None:
        m = mask
    elif variant == "condensed" and mask is not None:
        net = condense_for_speed(model, mask)
        m = condensed_mask(net, mask)
    params = dict(net.named_parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        for k, keep in m.items():
            g = params[k].grad
            if g is not None:
                g.mul_(keep)
        opt.step()
        if m:
            apply_mask(net, m)

    times = [_round(net, step, x, y, steps, batch, opt) for _ in range(repeats)]
    return statistics.median(times)
