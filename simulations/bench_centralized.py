"""Centralized DST benchmark: dense/static/SET/RigL/GMP over densities -> DIR/results.json."""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from client.trainer import evaluate, make_optimizer, train_steps
from strategies.sparse.engine import DSTConfig, DSTController
from strategies.sparse.flops import inference_flops, train_flops
from strategies.sparse.masks import Mask
from tasks.datasets import Dataset, load_dataset
from tasks.models import build_model

METHODS: tuple[str, ...] = ("static", "set", "rigl", "gmp")
CNN_DENSITIES: tuple[float, ...] = (0.5, 0.2, 0.1, 0.05)
OTHER_DENSITY = 0.2
# one colour per method in both panels of the plot
COLORS = {
    "dense": "black",
    "static": "tab:gray",
    "set": "tab:orange",
    "rigl": "tab:green",
    "gmp": "tab:purple",
}
REQUIRED_KEYS: tuple[str, ...] = (
    "task",
    "method",
    "density",
    "accuracy",
    "active_params",
    "total_params",
    "train_flops",
    "inference_flops",
    "wall_s",
    "seed",
    "dataset",
    "model",
)


@dataclass(frozen=True)
class Budget:
    """Training recipe of one model; the same for every method so comparisons are fair."""

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    update_interval: int  # RigL/SET delta T and GMP pruning interval, in steps
    drop_fraction: float = 0.3  # RigL alpha
    end_fraction: float = 0.75  # RigL/SET stop topology updates here (Evci et al. 2020)
    max_train: int | None = None  # subsample the training set (quick mode only)
    max_test: int | None = None  # subsample the test set (quick mode only)


# Tuned on MNIST-5k to fit ~25 min for the whole grid on 2 CPU cores; cosine LR over epochs.
BUDGETS: dict[str, Budget] = {
    "cnn": Budget(
        epochs=30, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=5e-4, update_interval=50
    ),
    "transformer": Budget(
        epochs=20, batch_size=64, optimizer="adam", lr=2e-3, weight_decay=0.0, update_interval=50
    ),
    "gnn": Budget(
        epochs=12, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0, update_interval=50
    ),
}
# CI smoke test: 8 steps per run, every method still does at least one topology update.
QUICK_BUDGET = Budget(
    epochs=2,
    batch_size=32,
    optimizer="adam",
    lr=3e-3,
    weight_decay=0.0,
    update_interval=2,
    max_train=128,
    max_test=200,
)


@dataclass(frozen=True)
class RunSpec:
    """One benchmark run."""

    model: str
    dataset: str
    method: str  # "dense" | "static" | "set" | "rigl" | "gmp"
    density: float
    budget: Budget

    @property
    def task(self) -> str:
        return f"{self.model}/{self.dataset}"


def plan(
    dataset: str = "mnist5k", quick: bool = False, gnn_dataset: str | None = None
) -> list[RunSpec]:
    """The grid: CNN x every method x 4 densities; transformer and GNN x every method at 0.2.

    Each model also gets a dense baseline (density 1.0). ``quick`` keeps the grid's shape but
    two CNN densities, RigL only for the others, and a tiny budget (CI smoke test).
    """
    gnn_ds = gnn_dataset or dataset
    densities = (0.5, 0.1) if quick else CNN_DENSITIES
    other_methods: Sequence[str] = ("rigl",) if quick else METHODS

    def budget(model: str) -> Budget:
        return QUICK_BUDGET if quick else BUDGETS[model]

    specs = [RunSpec("cnn", dataset, "dense", 1.0, budget("cnn"))]
    specs += [RunSpec("cnn", dataset, m, d, budget("cnn")) for d in densities for m in METHODS]
    for model, ds in (("transformer", dataset), ("gnn", gnn_ds)):
        specs.append(RunSpec(model, ds, "dense", 1.0, budget(model)))
        specs += [RunSpec(model, ds, m, OTHER_DENSITY, budget(model)) for m in other_methods]
    return specs


def _tensors(ds: Dataset, b: Budget) -> tuple[torch.Tensor, ...]:
    # Datasets are already shuffled (stratified splits), so a prefix is a fair subsample.
    n = len(ds.y_train) if b.max_train is None else min(b.max_train, len(ds.y_train))
    m = len(ds.y_test) if b.max_test is None else min(b.max_test, len(ds.y_test))
    return (
        torch.from_numpy(ds.x_train[:n]),  # [N, *input_shape]
        torch.from_numpy(ds.y_train[:n]),  # [N]
        torch.from_numpy(ds.x_test[:m]),
        torch.from_numpy(ds.y_test[:m]),
    )


def _update_steps(start: int, stop: int, cfg: DSTConfig, total_steps: int) -> int:
    """RigL steps in (start, stop] that compute a dense gradient (for the FLOPs count)."""
    if cfg.rule != "rigl":
        return 0
    end = int(cfg.end_fraction * total_steps)
    return sum(1 for s in range(start + 1, stop + 1) if s % cfg.update_interval == 0 and s < end)


def _param_counts(model: torch.nn.Module, mask: Mask) -> tuple[int, int]:
    """(active, total) over ALL parameters: masked tensors count their active entries."""
    total = active = 0
    for name, p in model.named_parameters():
        total += p.numel()
        active += int(mask[name].sum()) if name in mask else p.numel()
    return active, total


def run_one(spec: RunSpec, ds: Dataset, seed: int) -> dict[str, Any]:
    """Train one (model, method, density) from scratch and measure it."""
    b = spec.budget
    x, y, x_test, y_test = _tensors(ds, b)
    t0, c0 = time.perf_counter(), time.process_time()
    model = build_model(spec.model, ds.input_shape, ds.num_classes, seed=seed)
    optimizer = make_optimizer(model, b.optimizer, b.lr, 0.9, b.weight_decay)
    steps_per_epoch = max(1, len(x) // b.batch_size)
    total_steps = steps_per_epoch * b.epochs
    cfg = DSTConfig(
        rule=spec.method,
        density=spec.density if spec.method != "dense" else 1.0,
        distribution="erk",  # Evci et al. 2020: ERK beats uniform at equal parameter count
        drop_fraction=b.drop_fraction,
        update_interval=b.update_interval,
        end_fraction=b.end_fraction,
    )
    gen = torch.Generator().manual_seed(seed)
    controller = DSTController(
        model, optimizer, cfg, total_steps, generator=torch.Generator().manual_seed(seed + 1)
    )
    example = x[:1]  # [1, *input_shape]
    flops = 0
    losses: list[float] = []
    dropped = grown = 0
    for epoch in range(b.epochs):
        # Cosine LR over epochs (Loshchilov & Hutter 2017); one epoch per train_steps call so
        # every example is seen once per epoch.
        lr = 0.5 * b.lr * (1 + math.cos(math.pi * epoch / b.epochs))
        for group in optimizer.param_groups:
            group["lr"] = lr
        start = controller.step_count
        res = train_steps(model, controller, optimizer, x, y, steps_per_epoch, b.batch_size, gen)
        losses.append(res.loss)
        dropped += res.dropped
        grown += res.grown
        # FLOPs with the mask as it is at the end of the epoch (GMP's mask shrinks over time).
        flops += train_flops(
            model,
            example,
            controller.mask,
            steps_per_epoch * min(b.batch_size, len(x)),
            dense_grad_steps=_update_steps(start, controller.step_count, cfg, total_steps),
            batch_size=min(b.batch_size, len(x)),
        )
    test_loss, acc = evaluate(model, x_test, y_test)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    active, total = _param_counts(model, controller.mask)
    return {
        "task": spec.task,
        "model": spec.model,
        "dataset": spec.dataset,
        "method": spec.method,
        "density": spec.density,
        "accuracy": acc,
        "test_loss": test_loss,
        "final_train_loss": losses[-1] if losses else float("nan"),
        "active_params": active,
        "total_params": total,
        "train_flops": flops,
        "inference_flops": inference_flops(model, example, controller.mask),
        "wall_s": round(wall, 2),
        # CPU seconds of this process (all threads): unlike wall_s, not inflated when other
        # jobs share the cores.
        "cpu_s": round(cpu, 2),
        "seed": seed,
        "epochs": b.epochs,
        "steps": total_steps,
        "optimizer": b.optimizer,
        "lr": b.lr,
        "update_interval": b.update_interval,
        "dropped": dropped,
        "grown": grown,
        "train_examples": len(x),
        "test_examples": len(x_test),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy vs density per method (CNN), plus the transformer/GNN results at 0.2."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cnn = [r for r in rows if r["model"] == "cnn"]
    ax = axes[0]
    for method in METHODS:
        pts = sorted((r["density"], r["accuracy"]) for r in cnn if r["method"] == method)
        if pts:
            ax.plot(
                [p[0] for p in pts],
                [100 * p[1] for p in pts],
                marker="o",
                label=method,
                color=COLORS[method],
            )
    for r in cnn:
        if r["method"] == "dense":
            ax.axhline(100 * r["accuracy"], color=COLORS["dense"], ls="--", lw=1, label="dense")
    ax.set_xscale("log")
    densities = sorted({r["density"] for r in cnn if r["method"] != "dense"})
    ax.set_xticks(densities, [f"{d:g}" for d in densities])
    ax.minorticks_off()
    ax.set_xlabel("density (fraction of weights active)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"CNN on {cnn[0]['dataset'] if cnn else '?'}")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    others = [r for r in rows if r["model"] != "cnn"]
    tasks = sorted({r["task"] for r in others})
    methods = ["dense", *METHODS]
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        vals = [
            next(
                (100 * r["accuracy"] for r in others if r["task"] == t and r["method"] == method),
                0.0,
            )
            for t in tasks
        ]
        ax.bar(np.arange(len(tasks)) + i * width, vals, width, label=method, color=COLORS[method])
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    low = min((100 * r["accuracy"] for r in others), default=0.0)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"density {OTHER_DENSITY} vs dense")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (for the README)."""
    head = (
        "| task | method | density | accuracy (%) | active / total params | train GFLOPs "
        "| inference MFLOPs | wall s |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['method']} | {r['density']:g} | {100 * r['accuracy']:.1f} | "
            f"{r['active_params']:,} / {r['total_params']:,} | {r['train_flops'] / 1e9:.1f} | "
            f"{r['inference_flops'] / 1e6:.2f} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


_COST_RANK = {"gnn": 0, "transformer": 1, "cnn": 2, "mlp": 3}


@lru_cache(maxsize=4)
def _cached_dataset(name: str, seed: int) -> Dataset:
    return load_dataset(name, seed=seed)


def _worker_run(spec: RunSpec, seed: int) -> dict[str, Any]:
    """One run in a worker process with ONE intra-op thread (see ``run_centralized``)."""
    torch.set_num_threads(1)
    return run_one(spec, _cached_dataset(spec.dataset, seed), seed)


def run_centralized(
    out_dir: Path,
    dataset: str = "mnist5k",
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    gnn_dataset: str | None = None,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """Run the whole grid, write DIR/results.json and DIR/accuracy_vs_density.png, return rows.

    ``workers=1``: runs one after another with 2 intra-op threads (the 2-core reference
    machine). ``workers=2``: two processes with one thread each; same cores, but on a shared,
    oversubscribed machine this avoids OpenMP threads spinning at barriers (measured ~6x
    slower per step with 2 threads under load). Each run is seeded, so rows do not depend
    on ``workers``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = plan(dataset, quick, gnn_dataset)
    done: dict[int, dict[str, Any]] = {}
    t0 = time.perf_counter()

    def record(i: int, row: dict[str, Any]) -> None:
        done[i] = row
        # written after every run so a long benchmark leaves partial results if interrupted
        partial = [done[k] for k in sorted(done)]
        (out_dir / "results.json").write_text(json.dumps(partial, indent=2) + "\n")

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not progress,
        transient=False,
    ) as bar:
        job = bar.add_task("centralized", total=len(specs))
        if workers <= 1:
            torch.set_num_threads(2)  # the reference machine: 2 CPU cores
            for i, spec in enumerate(specs):
                bar.update(job, description=f"{spec.task} {spec.method} d={spec.density:g}")
                record(i, run_one(spec, _cached_dataset(spec.dataset, seed), seed))
                bar.advance(job)
        else:
            # spawn: a fresh interpreter per worker, never a fork of a process holding OpenMP
            # thread pools.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                # Longest runs first (GNN, transformer), so no worker idles at the end.
                order = sorted(range(len(specs)), key=lambda i: _COST_RANK[specs[i].model])
                futures = {pool.submit(_worker_run, specs[i], seed): i for i in order}
                for fut in as_completed(futures):
                    i = futures[fut]
                    record(i, fut.result())
                    spec = specs[i]
                    bar.update(job, description=f"{spec.task} {spec.method} d={spec.density:g}")
                    bar.advance(job)
    rows = [done[k] for k in sorted(done)]
    total = time.perf_counter() - t0
    plot(rows, out_dir / "accuracy_vs_density.png")
    (out_dir / "results.md").write_text(
        markdown_table(rows) + f"\n\nTotal wall time: {total:.0f} s (workers={workers})\n"
    )
    return rows


def register(bench_app: typer.Typer) -> None:
    """Add ``leanfed bench centralized`` to the CLI's bench group."""

    @bench_app.command("centralized")
    def centralized(
        out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path(
            "results/centralized"
        ),
        dataset: Annotated[str, typer.Option("--dataset", help="Dataset name.")] = "mnist5k",
        seed: Annotated[int, typer.Option("--seed")] = 0,
        quick: Annotated[bool, typer.Option("--quick", help="Tiny CI variant (seconds).")] = False,
        workers: Annotated[
            int, typer.Option("--workers", help="Processes (1 thread each if > 1).")
        ] = 1,
    ) -> None:
        """Dense vs static/SET/RigL/GMP on CNN (4 densities), transformer and GNN (0.2)."""
        t0 = time.perf_counter()
        rows = run_centralized(out, dataset=dataset, seed=seed, quick=quick, workers=workers)
        table = Table(title=f"centralized benchmark ({time.perf_counter() - t0:.0f} s)")
        for col in ("task", "method", "density", "acc %", "active/total", "train GFLOPs"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["task"],
                r["method"],
                f"{r['density']:g}",
                f"{100 * r['accuracy']:.1f}",
                f"{r['active_params']}/{r['total_params']}",
                f"{r['train_flops'] / 1e9:.2f}",
            )
        Console().print(table)
        Console().print(f"wrote {out / 'results.json'}")
