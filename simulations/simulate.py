"""`leanfed simulate`: the real ServerApp and ClientApp on the embedded or the Ray engine."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from flwr.common.config import flatten_dict
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.runner import RoundRecord, RunSummary
from server.security.signing import Signer, signer_from
from server.session import RunInterrupted, effective_config, run_recorded
from server.store import RunStore, resolve_db_url
from simulations.continual_summary import cl_summary, format_cl
from simulations.grid import InProcessGrid, quiet_flower
from tasks.config import ConfigError, LeanfedConfig

console = Console(stderr=True)


def load_overrides(path: Path | None) -> dict[str, Any]:
    """Flat dotted keys from a TOML override file (the same files `flwr run --run-config` takes)."""
    if path is None:
        return {}
    try:
        return flatten_dict(tomllib.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        kind = type(exc).__name__
        raise ConfigError(f"config file {path} is not a readable text file ({kind})") from exc


def build_config(path: Path | None, resume: str | None, extra: dict[str, Any]) -> LeanfedConfig:
    values = {**LeanfedConfig().to_run_config(), **load_overrides(path), **extra}
    if resume:
        values["resume"] = resume
    return LeanfedConfig.from_run_config(values)


Engine = Literal["inprocess", "ray"]
ENGINES: tuple[str, ...] = ("inprocess", "ray")


def default_workers() -> int:
    """One worker process per core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def simulate(
    cfg: LeanfedConfig,
    db_url: str,
    *,
    name: str | None = None,
    progress: bool = True,
    signer: Signer | None = None,
    engine: Engine = "inprocess",
    workers: int | None = None,
    ray_address: str | None = None,
) -> str:
    """Run one recorded simulation (checkpoints signed when ``signer``); return its run id.

    ``engine="inprocess"``: the embedded Grid with ``workers`` processes (0: every client in
    this process); ``engine="ray"``: Flower's simulation engine on a local Ray instance
    with ``workers`` CPUs, or on the Ray cluster at ``ray_address``.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    workers = default_workers() if workers is None else workers
    if workers < 0 or (engine == "ray" and workers < 1 and not ray_address):
        raise ConfigError(f"--workers {workers}: expected >= 1 (or 0 for the in-process engine)")
    if progress:
        quiet_flower()
    with RunStore(db_url) as store:
        cfg = effective_config(store, cfg, signer)
        bar = Progress(
            TextColumn("[bold]round"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not progress,
        )
        with bar:
            task = bar.add_task("rounds", total=cfg.num_server_rounds, info="")

            def on_start(_run_id: str, done: int) -> None:
                bar.update(task, completed=done)  # a resumed run starts where it stopped

            def on_round(rec: RoundRecord) -> None:
                bar.update(
                    task,
                    completed=rec.round,
                    info=f"acc {rec.accuracy:.3f}  up {rec.upload_bytes / 1e6:.2f} MB",
                )

            run_id, summary = _run(
                cfg, store, engine, workers, ray_address, name, on_round, signer, on_start
            )
        Console().print(summary_table(run_id, summary.rounds))
        if cfg.cl_scenario != "none":
            rows = {r.round: r.task_accuracies for r in summary.rounds if r.task_accuracies}
            base = summary.initial_task_accuracies or None
            cl = cl_summary(rows, cfg.cl_rounds_per_task, base)
            if cl:
                Console().print("continual: " + format_cl(cl))
        run = store.get_run(run_id)
        if run.status != "completed":
            console.print(f"[bold yellow]run {run.status}:[/] {escape(run.reason or '')}")
        console.print(f"stored in {store.url}; see `leanfed runs show {run_id}`")
    return run_id


def _run(
    cfg: LeanfedConfig,
    store: RunStore,
    engine: Engine,
    workers: int,
    ray_address: str | None,
    name: str | None,
    on_round: Callable[[RoundRecord], None],
    signer: Signer | None,
    on_start: Callable[[str, int], None] | None = None,
) -> tuple[str, RunSummary]:
    if engine == "ray":
        from simulations.ray_engine import run_on_ray  # imports Ray: only when asked for

        return run_on_ray(
            cfg,
            store,
            name=name,
            on_round=on_round,
            address=ray_address,
            num_cpus=workers,
            signer=signer,
        )
    with InProcessGrid(
        "client.app:app",
        num_nodes=cfg.num_partitions,
        run_config=cfg.replace(resume="").to_run_config(),
        workers=workers,
    ) as grid:
        return run_recorded(
            grid, cfg, store, name=name, on_round=on_round, on_start=on_start, signer=signer
        )


def summary_table(run_id: str, rounds: list[RoundRecord]) -> Table:
    """Every round of the run (a resumed run's earlier rounds too); degraded rounds marked."""
    table = Table(title=f"run {run_id}")
    cols = ("round", "accuracy", "loss", "accepted", "upload MB", "download MB", "density")
    for col in (*cols, "wall s"):
        table.add_column(col, justify="right")
    for r in rounds:
        accepted = "-" if r.num_accepted is None else str(r.num_accepted)
        table.add_row(
            str(r.round),
            f"{r.accuracy:.4f}",
            f"{r.loss:.4f}",
            f"[yellow]{accepted} (degraded)[/]" if r.degraded else accepted,
            f"{r.upload_bytes / 1e6:.3f}",
            f"{r.download_bytes / 1e6:.3f}",
            f"{r.density:.3f}",
            f"{r.wall_s:.2f}",
        )
    return table


def register(app: typer.Typer) -> None:
    """Add `leanfed simulate` to the CLI."""

    @app.command("simulate")
    def simulate_cmd(
        config: Annotated[
            Path | None, typer.Option("--config", help="TOML file of run-config overrides")
        ] = None,
        db: Annotated[
            str | None,
            typer.Option("--db", help="database URL (default: LEANFED_DB_URL, ./leanfed.db)"),
        ] = None,
        resume: Annotated[
            str | None,
            typer.Option("--resume", help="continue RUN_ID from its last committed round"),
        ] = None,
        rounds: Annotated[
            int | None, typer.Option("--rounds", help="override num-server-rounds")
        ] = None,
        clients: Annotated[
            int | None, typer.Option("--clients", help="override num-partitions")
        ] = None,
        name: Annotated[str | None, typer.Option("--name", help="a label for the run")] = None,
        no_progress: Annotated[bool, typer.Option("--no-progress")] = False,
        signing_key: Annotated[
            str | None,
            typer.Option(
                "--signing-key",
                help="Ed25519 key that signs checkpoints (default: $LEANFED_SIGNING_KEY; "
                "none: unsigned)",
            ),
        ] = None,
        engine: Annotated[
            str, typer.Option("--engine", help="inprocess (embedded pool) or ray (Flower's engine)")
        ] = "inprocess",
        workers: Annotated[
            int | None,
            typer.Option("--workers", help="worker processes / Ray CPUs (default: one per core)"),
        ] = None,
        ray_address: Annotated[
            str | None,
            typer.Option("--ray-address", help="Ray cluster HOST:PORT to join (--engine ray)"),
        ] = None,
    ) -> None:
        """Run a federated DST simulation on embedded defaults, recorded in the run store."""
        extra: dict[str, Any] = {}
        if rounds is not None:
            extra["num-server-rounds"] = rounds
        if clients is not None:
            extra["num-partitions"] = clients
        try:
            cfg = build_config(config, resume, extra)
            signer = signer_from(signing_key)
            simulate(
                cfg,
                resolve_db_url(db),
                name=name,
                progress=not no_progress,
                signer=signer,
                engine=engine,  # type: ignore[arg-type]
                workers=workers,
                ray_address=ray_address,
            )
        except RunInterrupted as stop:
            # Ctrl-C or SIGTERM: the run is stored as "interrupted"; say how to go on.
            console.print(str(stop), soft_wrap=True, highlight=False, markup=False)
            raise typer.Exit(130) from None
        # Every other leanfed error becomes one line at the CLI edge (simulations.edge),
        # or a full traceback with --debug.
