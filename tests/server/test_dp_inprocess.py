"""Differential privacy end to end: the real ServerApp/ClientApp on the in-process Grid."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from flwr.app import RecordDict

from client.app import app as client_app
from client.dp_local import account_site
from server.runner import build_strategy, run_federated
from simulations.grid import InProcessGrid
from strategies.aggregation.dp import DPSparseFedAvg
from strategies.privacy.accountant import PrivacyError, epsilon
from tasks.config import LeanfedConfig

BASE = LeanfedConfig(
    num_server_rounds=2,
    dataset="digits",
    model="mlp",
    num_partitions=4,
    min_train_nodes=2,
    fraction_train=0.5,
    local_steps=3,
    local_batch_size=16,
    dst_density=0.2,
    seed=1,
)


def _run(cfg: LeanfedConfig):  # type: ignore[no-untyped-def]
    grid = InProcessGrid(client_app, cfg.num_partitions, run_config=cfg.to_run_config())
    strategy = build_strategy(cfg)
    return run_federated(grid, cfg, strategy=strategy), strategy


def test_record_level_dp_reports_each_sites_epsilon() -> None:
    cfg = dataclasses.replace(BASE, privacy_mode="record", privacy_noise_multiplier=1.2)
    summary, strategy = _run(cfg)
    assert isinstance(strategy, DPSparseFedAvg)
    eps = [r.metrics["dp_epsilon"] for r in summary.rounds]
    assert all(math.isfinite(e) and e > 0 for e in eps)
    assert eps[-1] <= epsilon(1.2, 1.0, 6, 1e-5)  # at most 6 steps, q <= 1
    assert summary.final_state is not None
    assert all(bool(torch.isfinite(v).all()) for v in summary.final_state.values())
    assert strategy.mask is not None
    for k, m in strategy.mask.items():  # the model is still sparse: zeros off the mask
        assert torch.all(summary.final_state[k][~m] == 0)


def test_site_accounting_adds_steps_across_rounds() -> None:
    cfg = dataclasses.replace(BASE, privacy_mode="record", privacy_noise_multiplier=1.2)
    state = RecordDict()
    assert account_site(state, cfg, 3, 320) == (epsilon(1.2, 16 / 320, 3, 1e-5), 1)
    assert account_site(state, cfg, 3, 320) == (epsilon(1.2, 16 / 320, 6, 1e-5), 2)
    # a round of another step count would be under- or over-counted: refused
    with pytest.raises(PrivacyError, match="took 2 steps"):
        account_site(state, cfg, 2, 320)


def test_client_level_dp_noises_only_the_public_mask_and_accounts() -> None:
    cfg = dataclasses.replace(
        BASE, privacy_mode="client", privacy_noise_multiplier=0.8, privacy_clip=0.5
    )
    summary, strategy = _run(cfg)
    assert isinstance(strategy, DPSparseFedAvg)
    assert [r.metrics["dp_epsilon"] for r in summary.rounds] == [
        epsilon(0.8, 2 / 4, t, 1e-5) for t in (1, 2)
    ]
    assert strategy.mask is not None and strategy.mask_version == 0  # public mask fixed
    assert summary.final_state is not None
    for k, m in strategy.mask.items():
        assert torch.all(summary.final_state[k][~m] == 0)
        assert bool(torch.isfinite(summary.final_state[k]).all())


def test_adaptive_clip_changes_and_is_in_the_state() -> None:
    cfg = dataclasses.replace(
        BASE,
        privacy_mode="client",
        privacy_adaptive_clip=True,
        privacy_clip=2.0,
        privacy_noise_multiplier=0.3,
        fraction_train=1.0,
        min_train_nodes=4,
        num_server_rounds=3,
    )
    _, strategy = _run(cfg)
    assert isinstance(strategy, DPSparseFedAvg)
    # every update norm (~0.1-0.4) is below C: the noised unclipped fraction is ~1 > 0.5, so
    # C shrinks by about exp(-0.2 * 0.5) a round (count noise 0.3 on 4 clients)
    assert strategy.clip < 2.0 * math.exp(-0.2)
    state = strategy.dp_state_dict()
    assert state == {"dp_rounds": 3, "clip": strategy.clip}


def test_epsilon_is_stored_and_shown_by_runs_show_and_report(tmp_path, monkeypatch) -> None:
    from flwr.app import Context
    from typer.testing import CliRunner

    from server.app import app as server_app
    from server.store import RunStore
    from simulations.cli import app as cli
    from simulations.report import write_report

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    monkeypatch.setenv("LEANFED_DB_URL", url)
    cfg = dataclasses.replace(BASE, privacy_mode="client", privacy_noise_multiplier=0.8)
    grid = InProcessGrid(client_app, cfg.num_partitions, run_config=cfg.to_run_config())
    ctx = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_run_config()
    )
    server_app(grid, ctx)
    with RunStore(url) as store:
        (run,) = store.list_runs()
        rounds = store.get_rounds(run.id)
        assert [r.metrics["dp_epsilon"] for r in rounds] == [
            epsilon(0.8, 0.5, t, 1e-5) for t in (1, 2)
        ]
        report = write_report(store, run.id, tmp_path / "report").read_text()
    assert "## Privacy" in report and f"{rounds[-1].metrics['dp_epsilon']:.3f}" in report
    out = CliRunner().invoke(cli, ["runs", "show", run.id, "--db", url])
    assert out.exit_code == 0, out.output
    assert "dp_epsilon" in out.output
