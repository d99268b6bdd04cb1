"""secagg + client-level DP end to end: clients clip and noise, the server unmasks only the sum."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from client.app import app as client_app
from client.secagg import _dp_plan
from server.recorder import checkpoint_bytes
from server.runner import RunSummary, build_strategy, run_federated
from simulations.grid import DropoutGrid, quiet_flower
from strategies.aggregation.secagg_dp import SecAggDPSparseFedAvg
from strategies.aggregation.wire import decode_reply
from strategies.privacy.accountant import epsilon
from strategies.privacy.client_dp import clip_update
from strategies.secure import protocol as P
from strategies.secure.crypto import SecAggError
from tasks.config import ConfigError
from tests.strategies.aggregation.test_secagg import CFG

Z, C = 0.5, 0.1
DP = CFG.replace(
    secure_mode="secagg", privacy_mode="client", privacy_noise_multiplier=Z, privacy_clip=C
)
N_MIN = 3  # 5 nodes, complete graph, t = floor(0.5 * 5) + 1


def _run(cfg, drop: int = 0) -> tuple[DropoutGrid, Any, RunSummary]:  # type: ignore[no-untyped-def]
    quiet_flower()
    grid = DropoutGrid(client_app, cfg.num_partitions, run_config=cfg.to_run_config(), record=True)
    grid.drop_nodes = set(grid.node_ids[:drop])
    held: dict[str, Any] = {}
    summary = run_federated(grid, cfg, on_round=lambda rec, s, a: held.setdefault("s", s))
    return grid, held["s"], summary


@pytest.fixture(scope="module")
def plain() -> tuple[DropoutGrid, Any, RunSummary]:
    return _run(CFG)  # the same clients' updates in clear (static mask: the same training)


def _clipped_mean(plain, keep: set[int], sampled: int) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """Plaintext DP-FedAvg without its noise: g + sum_k clip_C(Delta_k on M) / sampled."""
    grid, strategy, _ = plain
    g, mask = strategy._global, strategy.mask
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in g.items()}
    for msg in grid.received:
        if msg.metadata.message_type != "train" or msg.metadata.src_node_id not in keep:
            continue
        u = decode_reply(msg, mask)
        delta = {
            k: (u.values[k].double() - g[k].double()) * ((mask[k] & u.mask[k]) if k in mask else 1)
            for k in g
        }
        clipped, _ = clip_update(delta, C)
        for k in total:
            total[k] += clipped[k]
    return {k: g[k].double() + total[k] / sampled for k in g}


def _noise(summary: RunSummary, plain, keep: set[int]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    _, strategy, _ = plain
    mask = strategy.mask
    want = _clipped_mean(plain, keep, 5)
    assert summary.final_state is not None
    for k, m in mask.items():  # zeros stay zero off the public mask: no noise there
        assert torch.all(summary.final_state[k][~m] == 0)
    return torch.cat(
        [
            (
                (summary.final_state[k].double() - want[k])[mask[k]]
                if k in mask
                else (summary.final_state[k].double() - want[k]).reshape(-1)
            )
            for k in sorted(want)
        ]
    )


def test_secure_dp_round_is_the_clipped_mean_plus_the_assumed_noise(plain) -> None:
    grid, strategy, summary = _run(DP)
    assert isinstance(strategy, SecAggDPSparseFedAvg)
    metrics = summary.rounds[0].metrics
    assert metrics["secagg_aborted"] == 0 and metrics["num_accepted"] == 5
    assert metrics["dp_epsilon"] == epsilon(Z, 5 / 5, 1, CFG.privacy_delta)
    assert strategy.dp_state_dict() == {"dp_rounds": 1, "clip": C}
    # the server received no update in clear: only key material and masked vectors
    assert not any(m.content.array_records or m.content.metric_records for m in grid.received)
    diff = _noise(summary, plain, set(grid.node_ids))
    # 5 survivors, each N(0, (z C)^2 / n_min): total (5 / 3) (z C)^2, over 5 sampled
    std = Z * C * math.sqrt(5 / N_MIN) / 5
    assert diff.numel() > 1000
    assert float(diff.std()) == pytest.approx(std, rel=0.1)
    assert float(diff.abs().max()) <= 6 * std + metrics["dp_quant_error_bound"] + 1e-6


def test_dropouts_complete_with_at_least_the_assumed_noise(plain) -> None:
    grid, strategy, summary = _run(DP, drop=2)
    metrics = summary.rounds[0].metrics
    assert metrics["secagg_aborted"] == 0 and metrics["num_accepted"] == 3
    assert metrics["dp_epsilon"] == epsilon(Z, 1.0, 1, CFG.privacy_delta)
    diff = _noise(summary, plain, set(grid.node_ids) - grid.drop_nodes)
    # n_min = 3 survivors: exactly the (z C)^2 the accountant assumes, still over 5 sampled
    assert float(diff.std()) == pytest.approx(Z * C / 5, rel=0.1)


def test_too_few_survivors_abort_and_are_not_accounted() -> None:
    _, strategy, summary = _run(DP, drop=3)
    metrics = summary.rounds[0].metrics
    assert metrics["secagg_aborted"] == 1 and metrics["dp_epsilon"] == 0.0
    assert strategy.dp_rounds == 0 and "DP noise needs at least 3" in strategy.aborts[0]["reason"]


def test_adaptive_clip_from_the_securely_summed_noised_count() -> None:
    cfg = DP.replace(
        num_server_rounds=2,
        privacy_adaptive_clip=True,
        privacy_clip=2.0,
        privacy_target_quantile=0.1,
    )
    _, strategy, summary = _run(cfg)
    clips = [r.metrics["dp_clip"] for r in summary.rounds]
    # every update norm is below C = 2: the noised unclipped fraction is ~1 (summed count
    # noise std 0.5 sqrt(5 / 3) over 5 sampled: ~0.13, 7 stds below 1 - 0.1), so C shrinks
    # by ~exp(-0.2 * (1 - 0.1)) a round
    assert clips[0] < 2.0 and clips[1] < clips[0]
    assert clips[1] == pytest.approx(2.0 * math.exp(-0.36), rel=0.25)
    assert [r.metrics["dp_epsilon"] for r in summary.rounds] == [
        epsilon(Z, 1.0, t, CFG.privacy_delta) for t in (1, 2)
    ]
    assert b"dp_rounds" in checkpoint_bytes(2, summary.final_state, strategy)


def test_config_accepts_the_combination_and_checks_it() -> None:
    assert isinstance(build_strategy(DP), SecAggDPSparseFedAvg)
    with pytest.raises(ConfigError, match="min-train-nodes"):
        DP.replace(min_train_nodes=1)
    with pytest.raises(ConfigError, match="ring"):
        DP.replace(secure_quant_bits=32, num_partitions=2**29)


def test_a_site_computes_n_min_itself_and_refuses_another() -> None:
    ctx = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=DP.to_run_config()
    )
    st = P.ClientState(round=1, node=1, c_sk=b"", s_sk=b"", threshold=3)
    rec = ConfigRecord(
        {
            "dp-clip": C,
            "dp-min-survivors": 4,
            "dp-sampled": 5,
            "dp-count-noise": 0.0,
            "quant-bits": 16,
            "num-clients": 5,
            "u1": P.ids_to_bytes(range(5)),
        }
    )
    shapes = {"w": (2, 2)}
    with pytest.raises(SecAggError, match="n_min is not 3"):  # floor(0.5 * 5) + 1
        _dp_plan(rec, st, ctx, shapes, {})
    rec["dp-min-survivors"], rec["num-clients"] = 3, 4  # fewer sharers than the group holds
    with pytest.raises(SecAggError, match="fewer key sharers"):
        _dp_plan(rec, st, ctx, shapes, {})
    rec["num-clients"] = 5
    floor = Context(
        run_id=1,
        node_id=1,
        node_config={"dp-min-noise-multiplier": 0.8},  # the site's own floor: z = 0.5 < 0.8
        state=RecordDict(),
        run_config=DP.to_run_config(),
    )
    with pytest.raises(SecAggError, match="below this site's dp-min-noise-multiplier"):
        _dp_plan(rec, st, floor, shapes, {})
    # the noise comes from the site's own z, not from anything the server sends
    assert _dp_plan(rec, st, ctx, shapes, {}).noise_std == pytest.approx(Z * C / math.sqrt(3))


def test_epsilon_is_stored_and_shown_with_the_real_server_app(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from server.app import app as server_app
    from server.store import RunStore
    from simulations.cli import app as cli

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    monkeypatch.setenv("LEANFED_DB_URL", url)
    cfg = DP.replace(num_server_rounds=2)
    grid = DropoutGrid(client_app, 5, run_config=cfg.to_run_config())
    ctx = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_run_config()
    )
    server_app(grid, ctx)
    with RunStore(url) as store:
        (run,) = store.list_runs()
        rounds = store.get_rounds(run.id)
    assert run.status == "completed"
    assert [r.metrics["dp_epsilon"] for r in rounds] == [
        epsilon(Z, 1.0, t, CFG.privacy_delta) for t in (1, 2)
    ]
    out = CliRunner().invoke(cli, ["runs", "show", run.id, "--db", url])
    assert out.exit_code == 0, out.output
    assert "dp_epsilon" in out.output and "privacy.mode=client" in out.output


def test_a_resumed_run_continues_the_accounting(tmp_path) -> None:
    from server.session import run_recorded
    from server.store import RunStore

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    cfg = DP.replace(num_server_rounds=2, privacy_adaptive_clip=True)

    def stop(rec) -> None:  # type: ignore[no-untyped-def]
        if rec.round == 1:
            raise KeyboardInterrupt

    grid = DropoutGrid(client_app, 5, run_config=cfg.to_run_config())
    with RunStore(url) as store:
        with pytest.raises(KeyboardInterrupt):
            run_recorded(grid, cfg, store, on_round=stop)
        (run,) = store.list_runs()
    resumed = cfg.replace(resume=run.id)
    grid = DropoutGrid(client_app, 5, run_config=cfg.to_run_config())
    with RunStore(url) as store:
        run_recorded(grid, resumed, store)
        rounds = store.get_rounds(run.id)
        latest = store.latest_checkpoint(run.id)
    # round 2 composes on the checkpointed count (1 round), not from scratch
    assert [r.round for r in rounds] == [1, 2]
    assert [r.metrics["dp_epsilon"] for r in rounds] == [
        epsilon(Z, 1.0, t, CFG.privacy_delta) for t in (1, 2)
    ]
    assert latest is not None and latest[0] == 2
    ck = torch.load(io.BytesIO(latest[1]), weights_only=True)
    assert ck["dp"] == {"dp_rounds": 2, "clip": rounds[1].metrics["dp_clip"]}
