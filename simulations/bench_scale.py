"""`leanfed bench scale`: Flower FedAvg and leanfed on Flower's Ray engine, leanfed embedded.

Side by side in one run, every cell in a fresh process (:mod:`simulations.scale_cell`):
seconds per round, client messages per second, start-up, peak RSS and RSS per idle
client, at 100 / 1,000 / 10,000 clients with 10 % and 100 % sampled. Same model and
data everywhere: an MLP on sklearn digits, 16 examples per client ("sample" partition),
2 local steps. A cell that fails or runs past its time limit is recorded with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import matplotlib
import psutil
import typer
from rich.console import Console

from simulations.simulate import default_workers
from tasks.config import LeanfedConfig

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

console = Console(stderr=True)

# (engine, strategy): Flower's own FedAvg and leanfed on Flower's engine, leanfed embedded.
ARMS: tuple[tuple[str, str], ...] = (
    ("ray", "flower-fedavg"),
    ("ray", "leanfed"),
    ("inprocess", "leanfed"),
)


@dataclass(frozen=True)
class Cell:
    """One measured run."""

    engine: str
    strategy: str
    clients: int
    fraction: float
    workers: int


def cell_config(cell: Cell, seed: int, rounds: int) -> LeanfedConfig:
    base = LeanfedConfig(
        num_server_rounds=rounds,
        seed=seed,
        dataset="digits",
        model="mlp",
        num_partitions=cell.clients,
        fraction_train=cell.fraction,
        min_train_nodes=2,
        partition_scheme="sample",
        partition_sample_size=16,
        local_steps=2,
        local_batch_size=8,
        local_lr=0.1,
    )
    if cell.strategy == "flower-fedavg":
        return base.replace(strategy="flower-fedavg", dst_rule="dense", dst_density=1.0)
    return base.replace(strategy="sparse", dst_rule="rigl", dst_density=0.1)


ENGINES = ("ray", "inprocess")


def plan(
    clients: Iterable[int],
    fractions: Iterable[float],
    workers: int,
    identity_check: int | None,
    engines: Iterable[str] = ENGINES,
) -> list[Cell]:
    """Cheap cells first, so a time budget cuts only the largest ones."""
    chosen = set(engines)
    cells = [
        Cell(engine, strategy, n, f, workers)
        for n in clients
        for f in fractions
        for engine, strategy in ARMS
        if engine in chosen
    ]
    if identity_check is not None and workers != 1 and "inprocess" in chosen:
        # The same embedded run on one worker: its model must be bit-identical.
        cells += [Cell("inprocess", "leanfed", identity_check, f, 1) for f in fractions]
    return sorted(cells, key=lambda c: c.clients * c.fraction)


def _stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """Stop a cell and everything it started (Ray's processes included), by PID."""
    try:
        family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    proc.wait()


def run_one(
    cell: Cell,
    seed: int,
    rounds: int,
    timeout: float,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run one cell in a fresh process; ``on_progress`` gets its lines (rounds) as they come."""
    labels = {"strategy": cell.strategy}
    with tempfile.TemporaryDirectory(prefix="leanfed-scale-cell-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        progress = Path(tmp) / "progress.txt"
        spec = {
            "engine": cell.engine,
            "workers": cell.workers,
            "config": cell_config(cell, seed, rounds).to_run_config(),
            "labels": labels,
            "progress": str(progress),
        }
        spec_path.write_text(json.dumps(spec))
        with open(Path(tmp) / "log.txt", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "simulations.scale_cell", str(spec_path), str(out_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            deadline, shown = time.monotonic() + timeout, 0
            rc: int | None = None
            while rc is None:
                try:
                    rc = proc.wait(timeout=max(0.01, min(2.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= deadline:
                        _stop_tree(proc)
                        return missing(
                            cell, f"did not finish {rounds} rounds within {timeout:.0f} s"
                        )
                if progress.exists() and on_progress is not None:
                    lines = progress.read_text().splitlines()
                    for line in lines[shown:]:
                        on_progress(line)
                    shown = len(lines)
        if rc != 0 or not out_path.exists():
            tail = (Path(tmp) / "log.txt").read_text(errors="replace").strip().splitlines()[-1:]
            return missing(cell, f"exit code {rc}: {' '.join(tail)[:300]}")
        row: dict[str, Any] = json.loads(out_path.read_text())
        return row


def missing(cell: Cell, reason: str) -> dict[str, Any]:
    return {
        "engine": cell.engine,
        "strategy": cell.strategy,
        "clients": cell.clients,
        "fraction": cell.fraction,
        "workers": cell.workers,
        "missing": reason,
    }


def summarize(rows: list[dict[str, Any]], at: int = 1000) -> dict[str, Any]:
    """Ratios behind the issue's targets at ``at`` clients, where both cells were measured."""

    def find(engine: str, strategy: str, n: int, f: float, workers: int | None = None) -> Any:
        for r in rows:
            same = (r["engine"], r["strategy"], r["clients"], r["fraction"]) == (
                engine,
                strategy,
                n,
                f,
            )
            if same and "missing" not in r and (workers is None or r["workers"] == workers):
                return r
        return None

    out: dict[str, Any] = {}
    for f in sorted({r["fraction"] for r in rows}):
        fed, lean = find("ray", "flower-fedavg", at, f), find("ray", "leanfed", at, f)
        if fed and lean:
            out[f"ray_leanfed_over_fedavg_round_s@{at}x{f}"] = (
                lean["round_s_median"] / fed["round_s_median"]
            )
        emb = [r for r in rows if r["engine"] == "inprocess" and r["clients"] == at]
        emb = [r for r in emb if r["fraction"] == f and "missing" not in r]
        main = max(emb, key=lambda r: r["workers"], default=None)
        if main and fed:
            out[f"inprocess_over_ray_fedavg_messages_per_s@{at}x{f}"] = (
                main["messages_per_s"] / fed["messages_per_s"]
            )
        if main and lean:
            out[f"inprocess_over_ray_leanfed_messages_per_s@{at}x{f}"] = (
                main["messages_per_s"] / lean["messages_per_s"]
            )
        one = next((r for r in emb if r["workers"] == 1), None)
        if main and one and main is not one:
            out[f"bit_identical_workers_1_vs_{main['workers']}@{at}x{f}"] = (
                main["model_sha256"] == one["model_sha256"]
            )
    # Marginal driver memory per extra client between 1,000 and 10,000 (same arm and
    # fraction): the idle-node cost without the fixed part (includes 10x the sampled replies).
    for r in rows:
        small = find(r["engine"], r["strategy"], 1000, r["fraction"], r.get("workers"))
        if r["clients"] == 10_000 and "missing" not in r and small:
            grow = (r["rss_per_idle_client_kb"] * 10_000 - small["rss_per_idle_client_kb"] * 1000)
            key = f"marginal_rss_kb_per_client_1000_to_10000x{r['fraction']}:{r['engine']}/"
            out[key + r["strategy"]] = grow / 9000
    big = [r for r in rows if r["clients"] == 10_000 and "missing" not in r]
    for r in big:
        key = f"peak_rss_gb@10000x{r['fraction']}:{r['engine']}/{r['strategy']}/w{r['workers']}"
        out[key] = r["peak_rss_mb"] / 1024
    return out


def table_md(rows: list[dict[str, Any]]) -> str:
    """The README table: one line per cell, missing cells with their reason."""
    head = (
        "| engine | strategy | workers | clients | sampled | round s (median, min-max) "
        "| messages/s | start-up s | peak RSS MB | RSS/idle client KB (bound) "
        "| state B/client |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        who = f"| {r['engine']} | {r['strategy']} | {r['workers']} | {r['clients']:,} "
        if "missing" in r:
            lines.append(who + f"| {r['fraction']:.0%} | missing: {r['missing']} | | | | | |")
            continue
        state = r.get("state_bytes_per_client")
        lines.append(
            who + f"| {r['messages_per_round']:,} ({r['fraction']:.0%}) "
            f"| {r['round_s_median']:.2f} ({r['round_s_min']:.2f}-{r['round_s_max']:.2f}) "
            f"| {r['messages_per_s']:.1f} | {r['startup_s']:.1f} | {r['peak_rss_mb']:,.0f} "
            f"| {r['rss_per_idle_client_kb']:.1f} | {'' if state is None else f'{state:,.0f}'} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str, float, int], list[dict[str, Any]]] = {}
    for r in rows:
        if "missing" not in r:
            series.setdefault((r["engine"], r["strategy"], r["fraction"], r["workers"]), []).append(
                r
            )
    for (engine, strategy, f, w), pts in sorted(series.items()):
        pts.sort(key=lambda r: r["clients"])
        x = [r["clients"] for r in pts]
        y = [r["round_s_median"] for r in pts]
        err = [
            [y_ - r["round_s_min"] for y_, r in zip(y, pts, strict=True)],
            [r["round_s_max"] - y_ for y_, r in zip(y, pts, strict=True)],
        ]
        style = "-" if f == 1.0 else "--"
        ax.errorbar(
            x,
            y,
            yerr=err,
            fmt="o" + style,
            capsize=3,
            label=f"{strategy} on {engine} (w={w}), {int(f * 100)} % sampled",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="simulated clients",
        ylabel="seconds per round (median, min-max)",
        title="Round time vs clients",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_bench(
    out_dir: Path,
    seed: int = 0,
    quick: bool = False,
    workers: int | None = None,
    cell_timeout: float = 600.0,
    budget_s: float | None = None,
    clients: list[int] | None = None,
    fractions: list[float] | None = None,
    max_messages: int | None = None,
    seconds_per_message: float = 0.05,
    engines: Iterable[str] = ENGINES,
) -> list[dict[str, Any]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = default_workers() if workers is None else workers
    rounds = 2 if quick else 3
    clients = clients or ([8] if quick else [100, 1000, 10_000])
    # --quick: the sampled fraction only (every cell is a fresh process, most Ray starts):
    # sampling is the path a full round is the special case of, and the arms, the rows and
    # the 1-vs-2-worker identity check are the same at either fraction.
    fractions = fractions or ([0.5] if quick else [0.1, 1.0])
    at = clients[-1] if quick else 1000
    cells = plan(
        clients, fractions, workers, identity_check=at if at in clients else None, engines=engines
    )
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for i, cell in enumerate(cells, 1):
        left = None if budget_s is None else budget_s - (time.perf_counter() - t0)
        if left is not None and left <= 0:
            rows.append(
                missing(cell, f"not run: the bench's time budget of {budget_s:.0f} s was spent")
            )
            continue
        n_msg = max(int(cell.clients * cell.fraction), 2)
        if max_messages is not None and n_msg > max_messages:
            rows.append(missing(cell, f"not run: {n_msg:,} messages per round > --max-messages"))
            continue
        # Larger cells get more time: start-up plus seconds_per_message per client message.
        limit = max(cell_timeout, 300.0 + rounds * n_msg * seconds_per_message)
        timeout = limit if left is None else min(limit, left)
        console.print(
            f"[{i}/{len(cells)}] {cell.strategy} on {cell.engine} (w={cell.workers}), "
            f"{cell.clients} clients x {cell.fraction} ({n_msg:,} messages/round, "
            f"limit {timeout:.0f} s, {time.perf_counter() - t0:.0f} s into the bench)"
        )
        row = run_one(cell, seed, rounds, timeout, lambda line: console.print(f"  {line}"))
        rows.append(row)
        if "missing" in row:
            console.print(f"  missing: {row['missing']}")
        else:
            console.print(
                f"  round {row['round_s_median']:.2f} s, {row['messages_per_s']:.1f} msg/s, "
                f"start {row['startup_s']:.1f} s, peak {row['peak_rss_mb']:.0f} MB"
            )
        (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    summary = {
        "command": "leanfed bench scale" + (" --quick" if quick else ""),
        "seed": seed,
        "rounds": rounds,
        "workers": workers,
        "cpus": os.cpu_count(),
        "wall_s": time.perf_counter() - t0,
        "targets": summarize(rows, at=at),
        "median_round_s": statistics.median(
            [r["round_s_median"] for r in rows if "missing" not in r] or [0.0]
        ),
    }
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "results.md").write_text(table_md(rows))
    plot(rows, out_dir / "round_time_vs_clients.png")
    return rows


def register(bench_app: typer.Typer) -> None:
    """Add `leanfed bench scale`."""

    @bench_app.command("scale")
    def scale_cmd(
        out: Annotated[Path, typer.Option("--out", help="directory for results.json and plot")],
        seed: Annotated[int, typer.Option("--seed")] = 0,
        quick: Annotated[bool, typer.Option("--quick", help="tiny CI variant")] = False,
        workers: Annotated[
            int | None, typer.Option("--workers", help="processes / Ray CPUs (default: cores)")
        ] = None,
        cell_timeout: Annotated[
            float, typer.Option("--cell-timeout", help="least seconds per cell")
        ] = 600.0,
        per_message: Annotated[
            float,
            typer.Option(
                "--seconds-per-message",
                help="a cell's limit: max(--cell-timeout, 300 + rounds x messages x this)",
            ),
        ] = 0.05,
        budget: Annotated[
            float | None, typer.Option("--budget", help="seconds for the whole bench")
        ] = None,
        clients: Annotated[
            str | None, typer.Option("--clients", help="comma list (default 100,1000,10000)")
        ] = None,
        fractions: Annotated[
            str | None, typer.Option("--fractions", help="comma list (default 0.1,1.0)")
        ] = None,
        max_messages: Annotated[
            int | None,
            typer.Option("--max-messages", help="record larger cells as not run"),
        ] = None,
        engines: Annotated[
            str | None,
            typer.Option("--engines", help="comma list of ray,inprocess (default both)"),
        ] = None,
    ) -> None:
        """Round time, messages/s, start-up and memory of both engines at 100-10,000 clients."""
        try:
            n = [int(c) for c in clients.split(",")] if clients else None
            f = [float(x) for x in fractions.split(",")] if fractions else None
        except ValueError as exc:
            console.print(f"[red]error:[/red] --clients/--fractions: {exc}")
            raise typer.Exit(1) from exc
        e = engines.split(",") if engines else list(ENGINES)
        if not e or any(x not in ENGINES for x in e):
            console.print(f"[red]error:[/red] --engines: a comma list of {', '.join(ENGINES)}")
            raise typer.Exit(1)
        rows = run_bench(
            out, seed, quick, workers, cell_timeout, budget, n, f, max_messages, per_message, e
        )
        done = sum("missing" not in r for r in rows)
        console.print(f"{done}/{len(rows)} cells measured; {out / 'results.json'}")
