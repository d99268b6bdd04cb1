"""`leanfed bench federated`: Flower FedAvg vs sparse static vs FedDST on one harness and engine.

Tasks: the CNN (the full grid of arms) and the transformer and GNN (dense, FedDST at 0.1,
condensed channel training), one table. Every run drives the real ServerApp strategy and
ClientApp through the same in-process Grid (real Flower serde on every message), so
accuracy, bytes and round wall time are comparable row to row. Bytes are the encoded
payloads of each message, both directions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Annotated, Any

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402

from client.app import app as client_app  # noqa: E402
from server.runner import RunSummary, run_federated  # noqa: E402
from simulations.federated_targets import targets  # noqa: E402
from simulations.grid import InProcessGrid, quiet_flower  # noqa: E402
from tasks.config import LeanfedConfig  # noqa: E402
from tasks.datasets import load_dataset  # noqa: E402
from tasks.partition import make_partition  # noqa: E402

console = Console(stderr=True)


@dataclass(frozen=True)
class Arm:
    """One row of the benchmark: a strategy, a client DST rule and a density."""

    strategy: str  # "flower-fedavg" | "leanfed-sparse" | "leanfed-feddst"
    rule: str
    density: float
    upload_dtype: str = "fp32"
    condensed: bool = False  # structured rules: clients train the condensed sub-network
    low_capacity: float = 1.0  # every second client declares this node capacity


@dataclass(frozen=True)
class TaskSpec:
    """Per-task settings: rounds of a full run and the clients' local optimizer."""

    rounds: int
    optimizer: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4


# "cnn" is the dataset's own model (the MLP on breast_cancer). The transformer and GNN train
# with Adam (SGD lr 0.1, momentum 0.9 left the GNN at chance after 2 rounds; 3-round probes
# on 4 clients, seed 0: GNN Adam 3e-3 -> 0.34, 1e-2 -> 0.67; transformer 2e-3 -> 0.41,
# 5e-3 -> 0.49) and 15 rounds: a GNN step costs ~5x a CNN step (a transformer step ~2x),
# so that the whole bench stays near 15 minutes on an idle 2-core machine.
TASKS: dict[str, TaskSpec] = {
    "cnn": TaskSpec(30),
    "transformer": TaskSpec(15, "adam", 5e-3, 0.0),
    "gnn": TaskSpec(15, "adam", 1e-2, 0.0),
}


def arms(quick: bool, task: str = "cnn") -> list[Arm]:
    """The CNN's full grid; the transformer and GNN: dense, FedDST 0.1, condensed channel 0.5."""
    if task != "cnn":
        return [
            Arm("flower-fedavg", "dense", 1.0),
            Arm("leanfed-feddst", "rigl", 0.1),
            Arm("leanfed-feddst", "channel", 0.5, condensed=True),
        ]
    densities = (0.1,) if quick else (0.5, 0.2, 0.1)
    out = [Arm("flower-fedavg", "dense", 1.0)]
    out += [Arm("leanfed-sparse", "static", d) for d in densities]
    out += [Arm("leanfed-feddst", "rigl", d) for d in densities]
    out += [Arm("leanfed-feddst", "rigl", 0.1, upload_dtype="fp16")]
    # Structured DST (whole channels; density = fraction of units kept): masked vs condensed
    # client training, and half the clients at capacity 0.25 (issue 8).
    for d in (0.5,) if quick else (0.5, 0.25):
        out += [Arm("leanfed-feddst", "channel", d)]
        out += [Arm("leanfed-feddst", "channel", d, condensed=True)]
    out += [Arm("leanfed-feddst", "channel", 0.5, condensed=True, low_capacity=0.25)]
    return out


def arm_config(arm: Arm, base: LeanfedConfig) -> LeanfedConfig:
    if arm.strategy == "flower-fedavg":
        return base.replace(strategy="flower-fedavg", dst_rule="dense", dst_density=1.0)
    return base.replace(
        strategy="sparse",
        dst_rule=arm.rule,
        dst_density=arm.density,
        codec_upload_dtype=arm.upload_dtype,
        dst_condensed=arm.condensed,
    )


def capacities(arm: Arm, clients: int) -> list[float]:
    """Node capacities: every second client (odd partition ids) at ``arm.low_capacity``."""
    return [arm.low_capacity if i % 2 else 1.0 for i in range(clients)]


def client_train_s(strategy: Any, rounds: list[int]) -> float | None:
    """Median over rounds of the median client local-training seconds ("train_s")."""
    per_round = []
    for r in rounds:
        rows = getattr(strategy, "round_clients", {}).get(r, [])
        times = [float(x["metrics"]["train_s"]) for x in rows if "train_s" in x.get("metrics", {})]
        if times:
            per_round.append(_median(times))
    return _median(per_round) if per_round else None


def base_config(
    dataset: str,
    seed: int,
    clients: int,
    rounds: int,
    alpha: float,
    quick: bool,
    task: str = "cnn",
) -> LeanfedConfig:
    model = task
    if task == "cnn":
        model = {"mnist5k": "cnn", "digits": "cnn", "breast_cancer": "mlp"}.get(dataset, "cnn")
    spec = TASKS[task]
    fraction, per_round = 0.5, max(1, clients // 2)
    if quick and task != "cnn" and per_round > 4:  # --quick: a GNN client's cost dominates
        fraction, per_round = 4 / clients, 4
    return LeanfedConfig(
        num_server_rounds=rounds,
        seed=seed,
        dataset=dataset,
        model=model,
        partition_scheme="dirichlet",
        partition_alpha=alpha,
        num_partitions=clients,
        fraction_train=fraction,
        min_train_nodes=per_round,
        local_steps=4 if quick else 20,
        local_batch_size=32,
        local_lr=spec.lr,
        local_optimizer=spec.optimizer,
        local_weight_decay=spec.weight_decay,
        # FedDST readjustment every ΔR=3 rounds with α=0.2 (tuned on seed 0; α=0.3/ΔR=1,
        # α=0.1/ΔR=1 and α=0.05/ΔR=1 ended 1.2-2.8 points lower).
        dst_mask_round_interval=3,
        dst_drop_fraction=0.2,
    )


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return 0.0 if n == 0 else (s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)


def row_for(
    arm: Arm,
    cfg: LeanfedConfig,
    summary: RunSummary,
    grid: InProcessGrid,
    train_s: float | None = None,
) -> dict[str, Any]:
    walls = [r.wall_s for r in summary.rounds]
    return {
        "task": cfg.model,
        "strategy": arm.strategy,
        "rule": arm.rule,
        "density": arm.density,
        "upload_dtype": arm.upload_dtype,
        "condensed": arm.condensed,
        "low_capacity": arm.low_capacity,  # every second client's node capacity
        "client_train_s": train_s,
        "rounds": len(summary.rounds),
        "final_accuracy": summary.final_accuracy,
        "initial_accuracy": summary.initial_accuracy,
        "accuracy_per_round": [r.accuracy for r in summary.rounds],
        "upload_bytes_per_round": [r.upload_bytes for r in summary.rounds],
        "upload_bytes": sum(r.upload_bytes for r in summary.rounds),
        "download_bytes": sum(r.download_bytes for r in summary.rounds),
        # Cross-check: whole serialized Flower messages (records + config), both directions.
        "wire_upload_bytes": sum(grid.traffic.received.values()),
        "wire_download_bytes": sum(grid.traffic.sent.values()),
        "round_wall_s": walls,
        "median_round_wall_s": _median(walls),
        "final_density": summary.rounds[-1].density if summary.rounds else 1.0,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "seed": cfg.seed,
        "num_clients": cfg.num_partitions,
        "clients_per_round": max(int(cfg.num_partitions * cfg.fraction_train), cfg.min_train_nodes),
        "alpha": cfg.partition_alpha,
        "local_steps": cfg.local_steps,
        "local_optimizer": cfg.local_optimizer,
        "local_lr": cfg.local_lr,
        "client_sizes": client_sizes(cfg),
    }


def client_sizes(cfg: LeanfedConfig) -> list[int]:
    """Training examples per client under the run's partition (the heterogeneity reported)."""
    labels = load_dataset(cfg.dataset, seed=cfg.seed).y_train
    part = make_partition(
        cfg.partition_scheme,
        labels,
        cfg.num_partitions,
        cfg.seed,
        cfg.partition_alpha,
        cfg.partition_shards,
        cfg.partition_sample_size,
    )
    return part.sizes


def _accuracy_plot(
    rows: list[dict[str, Any]], xs: list[list[float]], path: Path, xlabel: str, log_x: bool
) -> Path:
    """One line per row: test accuracy against ``xs[i]`` (rounds or cumulative MB)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, x in zip(rows, xs, strict=True):
        label = f"{r['strategy']} {r['rule']} d={r['density']} {r['upload_dtype']}"
        label += " condensed" if r["condensed"] else ""
        label += f" cap{r['low_capacity']:g}" if r["low_capacity"] < 1.0 else ""
        ax.plot(x, r["accuracy_per_round"], marker="." if log_x else None, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Accuracy vs {xlabel.split(' (')[0]}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Per task: accuracy vs round and vs cumulative upload (the first task unprefixed)."""
    paths: list[Path] = []
    for i, t in enumerate(dict.fromkeys(r["task"] for r in rows)):
        mine = [r for r in rows if r["task"] == t]
        prefix = "" if i == 0 else f"{t}_"
        rounds = [[float(k) for k in range(1, r["rounds"] + 1)] for r in mine]
        cum_mb = [[c / 1e6 for c in accumulate(r["upload_bytes_per_round"])] for r in mine]
        paths += [
            _accuracy_plot(
                mine, rounds, out_dir / f"{prefix}accuracy_vs_round.png", "round", False
            ),
            _accuracy_plot(
                mine,
                cum_mb,
                out_dir / f"{prefix}accuracy_vs_upload.png",
                "cumulative uploaded MB (log)",
                True,
            ),
        ]
    return paths


def run_bench(
    out_dir: Path,
    dataset: str = "mnist5k",
    seed: int = 0,
    clients: int = 20,
    rounds: int | None = None,
    alpha: float = 0.5,
    quick: bool = False,
    progress: bool = True,
    tasks: tuple[str, ...] = tuple(TASKS),
) -> list[dict[str, Any]]:
    """Every task's arms on ``dataset`` (default rounds per task: ``TASKS``; 3 when quick)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise typer.BadParameter(f"tasks must be among {', '.join(TASKS)}, got {unknown or '()'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    quiet_flower()
    plan: list[tuple[Arm, LeanfedConfig]] = []
    for t in tasks:
        quick_rounds = 3 if t == "cnn" else 2
        n = rounds if rounds is not None else (quick_rounds if quick else TASKS[t].rounds)
        base = base_config(dataset, seed, clients, n, alpha, quick, t)
        plan += [(arm, arm_config(arm, base)) for arm in arms(quick, t)]
    # torch's first Adam imports torch._dynamo (~1-2 s, once per process): do it here, not
    # inside the first Adam arm's first client, whose train_s and round wall it would inflate.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with Progress(console=console, disable=not progress) as bar:
        total = sum(cfg.num_server_rounds for _, cfg in plan)
        task = bar.add_task("federated bench", total=total)
        for arm, cfg in plan:
            grid = InProcessGrid(
                client_app,
                cfg.num_partitions,
                run_config=cfg.to_run_config(),
                capacities=capacities(arm, cfg.num_partitions),
            )
            bar.update(task, description=f"{cfg.model} {arm.strategy} {arm.rule} d={arm.density}")
            seen: dict[str, Any] = {}

            def on_round(rec: Any, strategy: Any, arrays: Any, seen: dict[str, Any] = seen) -> None:
                seen["strategy"] = strategy
                bar.advance(task)

            summary = run_federated(grid, cfg, on_round=on_round)
            train_s = client_train_s(seen.get("strategy"), [r.round for r in summary.rounds])
            rows.append(row_for(arm, cfg, summary, grid, train_s))
    result = {
        "command": "leanfed bench federated",
        "wall_s": time.perf_counter() - t0,
        "rows": rows,
        "targets": targets(rows),  # {task: {row key: measured ratios and gaps}}
    }
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "summary.json").write_text(json.dumps(result, indent=1))
    plot(rows, out_dir)
    return rows


def register(bench_app: typer.Typer) -> None:
    """Add `leanfed bench federated`."""

    @bench_app.command("federated")
    def federated_cmd(
        out: Annotated[Path, typer.Option("--out", help="directory for results.json and plots")],
        dataset: Annotated[str, typer.Option("--dataset")] = "mnist5k",
        seed: Annotated[int, typer.Option("--seed")] = 0,
        clients: Annotated[int, typer.Option("--clients")] = 20,
        rounds: Annotated[int | None, typer.Option("--rounds")] = None,
        alpha: Annotated[float, typer.Option("--alpha")] = 0.5,
        quick: Annotated[bool, typer.Option("--quick", help="tiny CI variant")] = False,
        tasks: Annotated[
            str, typer.Option("--tasks", help="comma-separated: cnn,transformer,gnn")
        ] = ",".join(TASKS),
    ) -> None:
        """Flower FedAvg vs leanfed sparse/FedDST per task: accuracy, bytes, client/round time."""
        names = tuple(t.strip() for t in tasks.split(",") if t.strip())
        rows = run_bench(out, dataset, seed, clients, rounds, alpha, quick, tasks=names)
        for r in rows:
            console.print(
                f"{r['task']:11s} {r['strategy']:15s} {r['rule']:7s} d={r['density']:<4}"
                f" {r['upload_dtype']}"
                f"  acc={r['final_accuracy']:.4f}  up={r['upload_bytes'] / 1e6:.2f}MB"
                f"  down={r['download_bytes'] / 1e6:.2f}MB"
                f"  med_round={r['median_round_wall_s']:.2f}s"
                f"  client_train={r['client_train_s'] or 0:.3f}s"
                + (" condensed" if r["condensed"] else "")
                + (f" cap{r['low_capacity']:g}" if r["low_capacity"] < 1.0 else "")
            )
