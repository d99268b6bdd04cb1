"""`leanfed simulate`: the main job; the real ServerApp/ClientApp code on an in-process Grid."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from flwr.common.config import flatten_dict
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from client.app import app as client_app
from server.runner import RoundRecord
from server.security.signing import Signer, signer_from
from server.session import effective_config, run_recorded
from server.store import RunStore, StoreError, resolve_db_url
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


def build_config(path: Path | None, resume: str | None, extra: dict[str, Any]) -> LeanfedConfig:
    values = {**LeanfedConfig().to_run_config(), **load_overrides(path), **extra}
    if resume:
        values["resume"] = resume
    return LeanfedConfig.from_run_config(values)


def simulate(
    cfg: LeanfedConfig,
    db_url: str,
    *,
    name: str | None = None,
    progress: bool = True,
    signer: Signer | None = None,
) -> str:
    """Run one recorded simulation (checkpoints signed when ``signer``); return its run id."""
    if progress:
        quiet_flower()
    with RunStore(db_url) as store:
        cfg = effective_config(store, cfg, signer)
        grid = InProcessGrid(
            client_app,
            num_nodes=cfg.num_partitions,
            run_config=cfg.replace(resume="").to_run_config(),
        )
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

            def on_round(rec: RoundRecord) -> None:
                bar.update(
                    task,
                    completed=rec.round,
                    info=f"acc {rec.accuracy:.3f}  up {rec.upload_bytes / 1e6:.2f} MB",
                )

            run_id, summary = run_recorded(
                grid, cfg, store, name=name, on_round=on_round, signer=signer
            )
        table = Table(title=f"run {run_id}")
        for col in ("round", "accuracy", "loss", "upload MB", "download MB", "density", "wall s"):
            table.add_column(col, justify="right")
        for r in summary.rounds:
            table.add_row(
                str(r.round),
                f"{r.accuracy:.4f}",
                f"{r.loss:.4f}",
                f"{r.upload_bytes / 1e6:.3f}",
                f"{r.download_bytes / 1e6:.3f}",
                f"{r.density:.3f}",
                f"{r.wall_s:.2f}",
            )
        Console().print(table)
        console.print(f"stored in {store.url}; see `leanfed runs show {run_id}`")
    return run_id


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
                cfg, resolve_db_url(db), name=name, progress=not no_progress, signer=signer
            )
        except (ConfigError, StoreError) as exc:
            # soft_wrap: one line whatever the terminal width; escape: no markup from data.
            console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(1) from exc
