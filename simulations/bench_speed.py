"""Speed benchmark: dense vs masked vs CSR vs condensed models, side by side -> DIR/results.json.

For each task (CNN, transformer, GNN on MNIST-5k, the GNN on its real per-batch pixel-grid
graph) one dense model and one structured-DST model per density (``channel`` rule: whole
units -- channels, neurons, attention heads -- where the model declares unit groups, constant
fan-in elsewhere) are trained with the SAME budget (epochs, optimizer, cosine LR); DST's
regrowth ends at ``end_fraction`` of the run so the last topology is fine-tuned. Each is
then run in the four variants of ``speed_variants``: inference latency at batch 1 and 64 on
1 and 2 threads (``torch.utils.benchmark``, median and IQR), one local-training round's wall
time, and test accuracy. Every number comes from this one process, one after another.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console

from client.trainer import evaluate, make_optimizer, train_steps
from simulations.speed_variants import latencies, train_round_s, variants
from strategies.sparse.engine import DSTConfig, DSTController
from strategies.sparse.flops import inference_flops
from strategies.sparse.masks import Mask, ones_mask, sparsifiable_shapes
from tasks.datasets import load_dataset
from tasks.models import build_model

VARIANTS: tuple[str, ...] = ("dense", "masked", "csr", "condensed")
REQUIRED_KEYS: tuple[str, ...] = (
    "task",
    "variant",
    "density",
    "batch",
    "threads",
    "latency_ms",
    "latency_ms_iqr",
    "accuracy",
    "train_round_s",
    "params",
    "inference_flops",
    "rule",
    "seed",
    "model",
    "distribution",
    "note",
)
# Why a row's value is missing or what it does not cover (null elsewhere).
NOTES = {
    "csr": "train_round_s null: PyTorch has no CPU autograd for CSR weights in sparse.mm",
    "gnn": "adjacency is data (a [B*N, B*N] sparse CSR matrix per batch), the same in every "
    "variant: condensing shrinks the hidden widths, not the graph",
    "gnn-csr": "GCN weights as CSR; the adjacency product is sparse in every variant",
    "cnn-csr": "convolutions stay dense (PyTorch has no CSR convolution): fc layers only",
    "transformer-csr": "embedding and head only: torch's fused encoder blocks read dense weights",
}
COLORS = {"dense": "black", "masked": "tab:gray", "csr": "tab:orange", "condensed": "tab:green"}


@dataclass(frozen=True)
class Plan:
    """What one run measures; ``QUICK`` is the CI smoke test (seconds)."""

    tasks: tuple[str, ...] = ("cnn", "transformer", "gnn")
    densities: tuple[float, ...] = (0.5, 0.2, 0.1)
    batches: tuple[int, ...] = (1, 64)
    threads: tuple[int, ...] = (1, 2)
    # Per task, the same for the dense and every sparse model (2-core budget: ~10 min of
    # training in all on an idle machine; the GNN step is ~7x the CNN's).
    epochs: tuple[int, ...] = (20, 15, 8)
    lr: tuple[float, ...] = (0.05, 2e-3, 3e-3)
    optimizer: tuple[str, ...] = ("sgd", "adam", "adam")
    # uniform for CNN and transformer: ERK keeps their small first layers (conv1, embed)
    # dense, and conv1's 16x28x28 maps dominate the CNN's batch-1 time; ERK for the GNN,
    # whose 4-unit node projection uniform would cut to one unit.
    distribution: tuple[str, ...] = ("uniform", "uniform", "erk")
    # Regrowth stops at a quarter of the run, replacing 10 % of the active units per update:
    # whole channels regrown at 0 set a small net back, and the final topology needs the
    # rest of the budget to train (measured, CNN at density 0.5, uniform: end 0.5 / alpha
    # 0.3 -> 96.6 %, end 0.25 / alpha 0.1 -> 97.7 %; dense 98.1 %).
    end_fraction: float = 0.25
    drop_fraction: float = 0.1
    batch_size: int = 64
    update_interval: int = 50
    round_steps: int = 20  # one local round = 20 steps of batch 64 (as in the federated bench)
    blocks: int = 15  # interleaved timing blocks per model (median and IQR over them)
    block_s: float = 0.02  # seconds per block
    max_train: int | None = None
    max_test: int | None = None
    rule: str = "channel"


FULL = Plan()
QUICK = replace(
    FULL,
    densities=(0.5,),
    batches=(1, 8),
    threads=(1,),
    epochs=(1, 1, 1),
    end_fraction=0.75,
    batch_size=16,
    update_interval=2,
    round_steps=2,
    blocks=3,
    block_s=0.002,
    max_train=64,
    max_test=32,
    optimizer=("adam", "adam", "adam"),
    lr=(3e-3, 3e-3, 3e-3),
)


def _train(
    task: int,
    plan: Plan,
    rule: str,
    density: float,
    data: tuple[torch.Tensor, ...],
    seed: int,
) -> tuple[torch.nn.Module, Mask]:
    name = plan.tasks[task]
    x, y, _, _ = data
    model = build_model(name, tuple(x.shape[1:]), 10, seed=seed)
    opt = make_optimizer(
        model,
        plan.optimizer[task],
        plan.lr[task],
        0.9,
        5e-4 if plan.optimizer[task] == "sgd" else 0.0,
    )
    epochs = plan.epochs[task]
    per_epoch = max(1, x.shape[0] // plan.batch_size)
    cfg = DSTConfig(
        rule=rule,
        density=density,
        distribution=plan.distribution[task],
        update_interval=plan.update_interval,
        end_fraction=plan.end_fraction,
        drop_fraction=plan.drop_fraction,
    )
    ctl = DSTController(
        model, opt, cfg, per_epoch * epochs, generator=torch.Generator().manual_seed(seed + 1)
    )
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):  # cosine LR over epochs, as in the centralized bench
        for group in opt.param_groups:
            group["lr"] = 0.5 * plan.lr[task] * (1 + math.cos(math.pi * epoch / epochs))
        train_steps(model, ctl, opt, x, y, per_epoch, plan.batch_size, gen)
    return model.eval(), ctl.mask


def _data(plan: Plan, seed: int) -> tuple[torch.Tensor, ...]:
    ds = load_dataset("mnist5k", seed=seed)
    n = len(ds.y_train) if plan.max_train is None else plan.max_train
    m = len(ds.y_test) if plan.max_test is None else plan.max_test
    return (
        torch.from_numpy(ds.x_train[:n]),
        torch.from_numpy(ds.y_train[:n]),
        torch.from_numpy(ds.x_test[:m]),
        torch.from_numpy(ds.y_test[:m]),
    )


def _note(task: str, variant: str) -> str | None:
    parts = [NOTES[k] for k in (variant, task, f"{task}-{variant}") if k in NOTES]
    return "; ".join(parts) or None


def _model_rows(
    task: str,
    density: float,
    models: dict[str, torch.nn.Module],
    mask: Mask,
    trained: torch.nn.Module,
    plan: Plan,
    data: tuple[torch.Tensor, ...],
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Accuracy, size, FLOPs and one training round of each variant (no latency yet)."""
    x, y, x_test, y_test = data
    i = plan.tasks.index(task)
    out = {}
    for variant, model in models.items():
        _, acc = evaluate(model, x_test, y_test)
        # active weights (masked, CSR: nonzeros; condensed: what the small net stores)
        params = sum(p.numel() for p in (model if variant == "condensed" else trained).parameters())
        if variant in ("masked", "csr"):
            params -= sum(int((~m).sum()) for m in mask.values())
        flops = None
        if variant != "condensed":
            flops = inference_flops(trained, x_test[:1], None if variant == "dense" else mask)
        torch.set_num_threads(1)
        round_s = train_round_s(
            variant,
            trained,
            None if variant == "dense" else mask,
            x,
            y,
            plan.round_steps,
            plan.batch_size,
        )
        out[f"{variant}@{density:g}"] = {
            "task": task,
            "variant": variant,
            "density": density,
            "accuracy": acc,
            "train_round_s": None if round_s is None else round(round_s, 4),
            "params": params,
            "inference_flops": flops,
            "rule": "dense" if variant == "dense" else plan.rule,
            "seed": seed,
            "model": task,
            "distribution": None if variant == "dense" else plan.distribution[i],
            "note": _note(task, variant),
        }
    return out


def _task_rows(
    task: int, plan: Plan, data: tuple[torch.Tensor, ...], seed: int, log: Console | None, t0: float
) -> list[dict[str, Any]]:
    """Train the task's dense and sparse models, then time all of them side by side."""
    name = plan.tasks[task]
    torch.set_num_threads(1)  # training on one thread: steadier on a shared machine
    dense, _ = _train(task, plan, "dense", 1.0, data, seed)
    full = ones_mask(sparsifiable_shapes(dense))
    models = {"dense@1": copy.deepcopy(dense).requires_grad_(False)}  # as ``variants`` does
    base = _model_rows(name, 1.0, {"dense": dense}, full, dense, plan, data, seed)
    for density in plan.densities:
        torch.set_num_threads(1)
        sparse, mask = _train(task, plan, plan.rule, density, data, seed)
        group = variants(dense, sparse, mask)
        del group["dense"]
        base |= _model_rows(name, density, group, mask, sparse, plan, data, seed)
        models |= {f"{v}@{density:g}": m for v, m in group.items()}
        if log is not None:
            log.print(f"{name} d={density:g} trained ({time.perf_counter() - t0:.0f} s)")
    rows = []
    x_test = data[2]
    for batch in plan.batches:
        for threads in plan.threads:
            lat = latencies(models, x_test[:batch], threads, plan.blocks, plan.block_s)
            for key, (med, iqr, cpu) in lat.items():
                rows.append(
                    {
                        **base[key],
                        "batch": batch,
                        "threads": threads,
                        "latency_ms": round(med, 4),
                        "latency_ms_iqr": round(iqr, 4),
                        "cpu_ms": round(cpu, 4),
                    }
                )
    return rows


def run_speed(
    out_dir: Path, seed: int = 0, quick: bool = False, log: Console | None = None
) -> list[dict[str, Any]]:
    """Run the benchmark; writes DIR/results.json (after every task), results.md and a plot."""
    plan = QUICK if quick else FULL
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _data(plan, seed)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i in range(len(plan.tasks)):
        rows += _task_rows(i, plan, data, seed, log, t0)
        (out_dir / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    total = time.perf_counter() - t0
    (out_dir / "results.md").write_text(
        markdown_table(rows) + f"\n\nTotal wall time: {total:.0f} s\n"
    )
    plot(rows, out_dir / "latency_vs_accuracy.png")
    return rows


def _get(rows: list[dict[str, Any]], **kw: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r[k] == v for k, v in kw.items())), None)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Per model: accuracy, size, batch-1/1-thread wall and CPU latency, batch-64/2-thread
    latency, training round; each with its ratio to the dense model of the same task."""
    head = (
        "| task | variant | density | accuracy (%) | params | b1 t1 ms (IQR) | vs dense "
        "| b1 t1 CPU ms | vs dense | b64 t2 ms (IQR) | vs dense | train round s | vs dense |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    out = [head]
    b_hi = max(r["batch"] for r in rows)
    t_hi = max(r["threads"] for r in rows)
    for r in rows:
        if r["batch"] != 1 or r["threads"] != 1:
            continue
        d1 = _get(rows, task=r["task"], variant="dense", batch=1, threads=1)
        hi = _get(
            rows,
            task=r["task"],
            variant=r["variant"],
            density=r["density"],
            batch=b_hi,
            threads=t_hi,
        )
        dhi = _get(rows, task=r["task"], variant="dense", batch=b_hi, threads=t_hi)
        assert d1 is not None and hi is not None and dhi is not None
        rs, drs = r["train_round_s"], d1["train_round_s"]
        out.append(
            f"| {r['task']} | {r['variant']} | {r['density']:g} | {100 * r['accuracy']:.1f} "
            f"| {r['params']:,} | {r['latency_ms']:.3f} ({r['latency_ms_iqr']:.3f}) "
            f"| {r['latency_ms'] / d1['latency_ms']:.2f}x "
            f"| {r['cpu_ms']:.3f} | {r['cpu_ms'] / d1['cpu_ms']:.2f}x "
            f"| {hi['latency_ms']:.2f} ({hi['latency_ms_iqr']:.2f}) "
            f"| {hi['latency_ms'] / dhi['latency_ms']:.2f}x "
            f"| {'-' if rs is None else f'{rs:.3f}'} "
            f"| {'-' if rs is None else f'{rs / drs:.2f}x'} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy vs batch-1, 1-thread latency per task; one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for variant in VARIANTS:
            pts = [
                r
                for r in rows
                if r["task"] == task
                and r["variant"] == variant
                and r["batch"] == 1
                and r["threads"] == 1
            ]
            ax.scatter(
                [r["latency_ms"] for r in pts],
                [100 * r["accuracy"] for r in pts],
                color=COLORS[variant],
                label=variant,
            )
            for r in pts:
                ax.annotate(
                    f"{r['density']:g}",
                    (r["latency_ms"], 100 * r["accuracy"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xlabel("latency, batch 1, 1 thread (ms)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def register(bench_app: typer.Typer) -> None:
    """Add ``leanfed bench speed`` to the CLI's bench group."""

    @bench_app.command("speed")
    def speed(
        out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path(
            "results/speed"
        ),
        seed: Annotated[int, typer.Option("--seed")] = 0,
        quick: Annotated[bool, typer.Option("--quick", help="Tiny CI variant (seconds).")] = False,
    ) -> None:
        """Dense vs masked vs CSR vs condensed: latency, training round, accuracy."""
        console = Console()
        rows = run_speed(out, seed=seed, quick=quick, log=console)
        console.print(markdown_table(rows))
        console.print(f"wrote {out / 'results.json'}")
