"""`leanfed bench privacy`: the cost of SecAgg+ secure aggregation vs plaintext sparse rounds.

Rows (issue 10 schema): ``mode`` ("plain" | "secagg"), ``clients`` (all sampled every
round), ``density``, ``epsilon``/``delta`` (null: no differential privacy in these rows),
``final_accuracy``, ``upload_bytes``, ``download_bytes`` (encoded payloads summed over
the run: codec payloads for plaintext; for SecAgg+ the serialized stage records and the
packed masked vectors), ``round_wall_s`` (list), ``seed``; plus ``dropout``, the fraction
of nodes whose masked input is lost after key sharing every round (a timeout), and the
ratios to the plaintext row of the same client count. Same harness as `bench federated`:
MNIST-5k CNN, FedDST RigL at density 0.1 (readjust every 3 rounds, alpha 0.2).
``--parts secagg,dp`` picks the halves (two commands can run them apart), ``--dp-kinds``
the DP arms (`bench_privacy_dp.KINDS`: record, client, secagg+dp-client, secagg+dp-record);
``--jobs N`` runs
N arms side by side in spawn processes, each on one torch thread (`simulations.bench_jobs`),
so the rows equal ``--jobs 1``'s except the timing fields (``round_wall_s``: arms side by
side share the cores).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from client.app import app as client_app  # noqa: E402
from server.runner import run_federated  # noqa: E402
from simulations.bench_federated import base_config  # noqa: E402
from simulations.bench_jobs import run_jobs  # noqa: E402
from simulations.bench_privacy_dp import KINDS, dp_rows, neighbours_for  # noqa: E402
from simulations.grid import DropoutGrid, quiet_flower  # noqa: E402
from tasks.config import LeanfedConfig  # noqa: E402

console = Console(stderr=True)
PARTS = ("secagg", "dp")


def arms(client_counts: list[int], dropout: float) -> list[tuple[str, int, float]]:
    """(mode, clients, dropout after key sharing) per row."""
    out: list[tuple[str, int, float]] = []
    for n in client_counts:
        out += [("plain", n, 0.0), ("secagg", n, 0.0), ("secagg", n, dropout)]
    return out


def arm_config(base: LeanfedConfig, mode: str, clients: int) -> LeanfedConfig:
    return base.replace(
        num_partitions=clients,
        fraction_train=1.0,
        min_train_nodes=clients,
        secure_mode="secagg" if mode == "secagg" else "none",
        secure_neighbors=neighbours_for(clients),
    )


def run_arm(cfg: LeanfedConfig, mode: str, dropout: float) -> dict[str, Any]:
    grid = DropoutGrid(
        client_app,
        cfg.num_partitions,
        run_config=cfg.to_run_config(),
        drop_fraction=dropout,
        seed=cfg.seed,
    )
    held: dict[str, Any] = {}
    summary = run_federated(grid, cfg, on_round=lambda rec, s, a: held.setdefault("s", s))
    rounds = summary.rounds
    return {
        "mode": mode,
        "clients": cfg.num_partitions,
        "density": cfg.dst_density,
        "epsilon": None,
        "delta": None,
        "final_accuracy": summary.final_accuracy,
        "upload_bytes": sum(r.upload_bytes for r in rounds),
        "download_bytes": sum(r.download_bytes for r in rounds),
        "round_wall_s": [r.wall_s for r in rounds],
        "seed": cfg.seed,
        "dropout": dropout,
        "rounds": len(rounds),
        "accuracy_per_round": [r.accuracy for r in rounds],
        "upload_bytes_per_round": [r.upload_bytes for r in rounds],
        "wire_upload_bytes": sum(grid.traffic.received.values()),
        "wire_download_bytes": sum(grid.traffic.sent.values()),
        "aborted_rounds": sum(int(r.metrics.get("secagg_aborted", 0)) for r in rounds),
        "accepted_per_round": [int(r.metrics.get("num_accepted", 0)) for r in rounds],
        "secure_clipped_fraction_max": max(
            (float(r.metrics.get("secure_clipped_fraction", 0.0)) for r in rounds), default=0.0
        ),
        "neighbors": cfg.secure_neighbors if mode == "secagg" else None,
        "threshold": cfg.secure_threshold if mode == "secagg" else None,
        "quant_bits": cfg.secure_quant_bits if mode == "secagg" else None,
        "clip": cfg.secure_clip if mode == "secagg" else None,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "local_steps": cfg.local_steps,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """upload/download ratio of every row to the plaintext row with the same client count."""
    plain = {r["clients"]: r for r in rows if r["mode"] == "plain"}
    for r in rows:
        p = plain.get(r["clients"])
        r["upload_ratio"] = r["upload_bytes"] / p["upload_bytes"] if p else None
        r["download_ratio"] = r["download_bytes"] / p["download_bytes"] if p else None


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['mode']}\nn={r['clients']}\ndrop {r['dropout']:.0%}" for r in rows]
    ax.bar(range(len(rows)), [r["upload_bytes"] / 1e6 for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("uploaded MB (whole run)")
    ax.set_title("Upload cost of SecAgg+ vs plaintext sparse rounds (density 0.1)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_dp(rows: list[dict[str, Any]], path: Path) -> Path:
    """Final accuracy vs epsilon (inf drawn at the right edge), one line per kind x density."""
    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [r["epsilon"] for r in rows if r["epsilon"] is not None] or [1.0]
    inf_x = max(finite) * 2
    for kind in KINDS:
        for density in sorted({r["density"] for r in rows}):
            arm = [r for r in rows if r["dp_kind"] == kind and r["density"] == density]
            if not arm:
                continue
            xs = [inf_x if r["epsilon"] is None else r["epsilon"] for r in arm]
            ys = [100 * r["final_accuracy"] for r in arm]
            name = kind if kind.startswith("secagg") else f"{kind}-level"
            ax.plot(xs, ys, marker="o", label=f"{name}, density {density:g}")
    ax.set_xscale("log")
    ax.set(xlabel="epsilon (delta = 1e-5; right edge = no DP)", ylabel="final test accuracy (%)")
    ax.set_title("Accuracy vs privacy budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_bench(
    out_dir: Path,
    seed: int = 0,
    client_counts: list[int] | None = None,
    rounds: int | None = None,
    dropout: float = 0.3,
    quick: bool = False,
    dataset: str = "mnist5k",
    local_steps: int | None = None,
    parts: tuple[str, ...] = ("secagg",),
    jobs: int = 1,
    dp_kinds: tuple[str, ...] = KINDS,
) -> list[dict[str, Any]]:
    """The rows of ``parts`` ("secagg": secure aggregation vs plaintext; "dp": DP arms)."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ValueError(f"--parts: expected a non-empty subset of {','.join(PARTS)}, got {parts}")
    if not dp_kinds or set(dp_kinds) - set(KINDS):
        raise ValueError(f"--dp-kinds: expected a non-empty subset of {','.join(KINDS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    quiet_flower()
    counts = client_counts or ([4] if quick else [10, 100])
    # 5 rounds: clients readjust and the server re-votes on round 3 only (FedDST every 3
    # rounds, none from 80 % on): 1 in 5, close to a 30-round run's 7 in 30.
    n_rounds = rounds if rounds is not None else (3 if quick else 5)
    base = base_config(dataset, seed, counts[0], n_rounds, 0.5, quick)
    if local_steps is not None:  # bytes do not depend on it; accuracy and wall time do
        base = base.replace(local_steps=local_steps)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if "secagg" in parts:
        todo = [(arm_config(base, m, n), m, d) for m, n, d in arms(counts, dropout)]
        rows = run_jobs(run_arm, todo, jobs, "privacy bench: secure-aggregation arm")
        add_ratios(rows)
    secure_rows = list(rows)
    if "dp" in parts:  # accuracy vs epsilon, record- and client-level (bench_privacy_dp.py)
        console.print("privacy bench: differential-privacy arms")
        dp = dp_rows(seed, quick, jobs=jobs, kinds=dp_kinds)
        plot_dp(dp, out_dir / "accuracy_vs_epsilon.png")
        rows += dp
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    summary = {
        "command": "leanfed bench privacy",
        "parts": list(parts),
        "dp_kinds": list(dp_kinds) if "dp" in parts else [],
        "jobs": jobs,
        "wall_s": time.perf_counter() - t0,
        "targets": {
            f"secagg-{r['clients']}-dropout-{r['dropout']}": {
                "upload_ratio": r["upload_ratio"],
                "upload_ratio_target": 2.0,
                "aborted_rounds": r["aborted_rounds"],
            }
            for r in secure_rows
            if r["mode"] == "secagg"
        },
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if secure_rows:
        plot(secure_rows, out_dir / "upload_bytes.png")
    return rows


def register(bench_app: typer.Typer) -> None:
    """Add `leanfed bench privacy`."""

    @bench_app.command("privacy")
    def privacy_cmd(
        out: Annotated[Path, typer.Option("--out", help="directory for results.json and plots")],
        seed: Annotated[int, typer.Option("--seed")] = 0,
        clients: Annotated[list[int] | None, typer.Option("--clients")] = None,
        rounds: Annotated[int | None, typer.Option("--rounds")] = None,
        dropout: Annotated[float, typer.Option("--dropout")] = 0.3,
        dataset: Annotated[str, typer.Option("--dataset")] = "mnist5k",
        local_steps: Annotated[int | None, typer.Option("--local-steps")] = None,
        quick: Annotated[bool, typer.Option("--quick", help="tiny CI variant")] = False,
        dp: Annotated[bool, typer.Option("--dp/--no-dp", help="--no-dp: as --parts secagg")] = True,
        parts: Annotated[
            str, typer.Option("--parts", help="comma-separated subset of secagg,dp")
        ] = "secagg,dp",
        jobs: Annotated[int, typer.Option("--jobs", help="arms side by side (processes)")] = 1,
        dp_kinds: Annotated[
            str, typer.Option("--dp-kinds", help=f"DP arms, a subset of {','.join(KINDS)}")
        ] = ",".join(KINDS),
    ) -> None:
        """Secure aggregation vs plaintext, and accuracy vs DP epsilon (sparse vs dense)."""
        if jobs < 1:
            raise typer.BadParameter("--jobs must be >= 1")
        picked = tuple(p for p in (x.strip() for x in parts.split(",")) if p)
        if not dp:
            picked = tuple(p for p in picked if p != "dp")
        kinds = tuple(k for k in (x.strip() for x in dp_kinds.split(",")) if k)
        try:
            rows = run_bench(
                out,
                seed,
                clients,
                rounds,
                dropout,
                quick,
                dataset,
                local_steps,
                picked,
                jobs,
                dp_kinds=kinds,
            )
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        for r in rows:
            if "dp_kind" in r:
                eps = "inf" if r["epsilon"] is None else f"{r['epsilon']:g}"
                console.print(
                    f"{r['mode']:16s} {r['dp_kind']:16s} n={r['clients']:<4d} d={r['density']:g}"
                    f"  eps={eps}  acc={r['final_accuracy']:.4f}"
                )
                continue
            console.print(
                f"{r['mode']:7s} n={r['clients']:<4d} drop={r['dropout']:.1f}"
                f"  acc={r['final_accuracy']:.4f}  up={r['upload_bytes'] / 1e6:.2f}MB"
                f" (x{r['upload_ratio']:.2f})  down={r['download_bytes'] / 1e6:.2f}MB"
                f"  aborted={r['aborted_rounds']}"
            )
