"""The DP arms of the privacy benchmark: calibrated noise, the issue's row schema."""

import math

import pytest
import torch

from client.app import app as client_app
from server.runner import run_federated
from simulations.bench_privacy_dp import (
    SECAGG_RECORD,
    _site_sizes,
    dp_arm_config,
    dp_plan,
    dp_rows,
    weight_cap,
)
from simulations.grid import InProcessGrid, quiet_flower
from strategies.privacy.accountant import SiteAccounting, epsilon, noise_multiplier_for
from strategies.secure.ring import error_bound
from tasks.config import LeanfedConfig


def test_noise_is_calibrated_for_the_worst_site() -> None:
    base = LeanfedConfig(
        dataset="digits",
        model="mlp",
        num_partitions=4,
        num_server_rounds=3,
        local_steps=5,
        local_batch_size=16,
        partition_scheme="iid",
    )
    cfg = dp_arm_config(base, "record", 3.0, 0.1)
    assert cfg.privacy_mode == "record" and cfg.dst_density == 0.1
    # the smallest IID digits partition has about 1437 / 4 examples
    q = 16 / 359
    assert epsilon(cfg.privacy_noise_multiplier, q, 15, 1e-5) <= 3.0 * 1.01
    # the calibration uses the sites' own accounting: the worst site meets the target
    assert SiteAccounting.of(cfg).site_epsilon(359, 3) <= 3.0
    dense = dp_arm_config(base, "client", math.inf, 1.0)
    assert dense.privacy_mode == "none" and dense.dst_rule == "dense"


def _seeded(row: dict[str, object]) -> dict[str, object]:
    """What the seed fixes: not timing, nor secagg+dp-client's accuracy (its noise comes
    from each client's OS entropy: the server knows the run seed and could replay it)."""
    drop = {"round_wall_s"}
    if row["mode"] == "secagg+dp-client":
        drop |= {"final_accuracy", "accuracy_per_round"}
    return {k: v for k, v in row.items() if k not in drop}


def test_quick_dp_rows_have_the_schema_and_meet_their_epsilon(
    privacy_row_keys: frozenset[str],
) -> None:
    rows = dp_rows(seed=0, quick=True, epsilons=(3.0, math.inf), densities=(0.1,))
    # side by side (spawn processes, one torch thread each): the same rows but for timing
    side = dp_rows(seed=0, quick=True, epsilons=(3.0, math.inf), densities=(0.1,), jobs=2)
    assert [_seeded(r) for r in side] == [_seeded(r) for r in rows]
    assert [(r["mode"], r["epsilon"]) for r in rows] == [
        ("dp-record", 3.0),
        ("plain", None),
        ("dp-client", 3.0),
        ("plain", None),
        ("secagg+dp-client", 3.0),  # sparse, finite epsilon only
        ("secagg+dp-record", 3.0),  # sparse only
        ("secagg", None),  # the record-level settings without DP, under SecAgg+
    ]
    for r in rows:
        assert set(r) >= privacy_row_keys
        assert 0.0 <= r["final_accuracy"] <= 1.0 and len(r["round_wall_s"]) == 2
        assert all(math.isfinite(t) and t > 0 for t in r["round_wall_s"])
        if r["epsilon"] is not None:
            assert r["reported_epsilon_max"] is not None
            assert r["reported_epsilon_max"] <= r["epsilon"] * 1.01
    central, distributed = rows[2], rows[4]
    # the same calibrated noise multiplier, hence the same accounted epsilon per round
    assert distributed["noise_multiplier"] == central["noise_multiplier"]
    assert distributed["reported_epsilon_max"] == central["reported_epsilon_max"]
    assert distributed["aborted_rounds"] == 0 and distributed["dp_kind"] == "secagg+dp-client"
    # masked vectors of 4 sampled clients over 2 rounds, not the plaintext codec payloads
    assert (
        distributed["upload_bytes"] > 0 and distributed["upload_bytes"] != central["upload_bytes"]
    )
    record, record_inf, secure, secure_inf = rows[0], rows[1], rows[5], rows[6]
    # record-level DP under SecAgg+: the same seeded DP-SGD noise and the same sites, so the
    # same sites' epsilons, and the result differs from plaintext only by the quantization
    # of the secure sum (far below one test example's share of the accuracy)
    assert secure["dp_kind"] == secure_inf["dp_kind"] == SECAGG_RECORD
    assert (secure["clients"], secure["density"], secure["delta"]) == (4, 0.1, 1e-5)
    assert secure["noise_multiplier"] == record["noise_multiplier"]
    assert secure["reported_epsilon_max"] == record["reported_epsilon_max"]
    assert secure["aborted_rounds"] == secure_inf["aborted_rounds"] == 0
    for a, b in ((secure, record), (secure_inf, record_inf)):
        assert a["accuracy_per_round"] == pytest.approx(b["accuracy_per_round"], abs=1e-9)
        assert a["upload_bytes"] > 0 and a["upload_bytes"] != b["upload_bytes"]


def test_secagg_record_round_equals_plaintext_dp_record_within_quantization() -> None:
    """One round of the quick arms: the global models differ by at most the secure sum's
    quantization error (the DP-SGD noise is seeded per site and round: the same in both)."""
    quiet_flower()
    plan = dp_plan(0, True, (3.0,), (0.1,), ("record", SECAGG_RECORD))
    states = []
    for cfg, _, _ in plan:
        cfg = cfg.replace(num_server_rounds=1)
        grid = InProcessGrid(client_app, cfg.num_partitions, run_config=cfg.to_run_config())
        summary = run_federated(grid, cfg)
        assert summary.final_state is not None
        states.append(summary.final_state)
    plain, secure = states
    secure_cfg = plan[1][0]
    bound = error_bound(secure_cfg.secure_clip, secure_cfg.secure_quant_bits)
    worst = max(float(torch.max(torch.abs(secure[k] - plain[k]))) for k in plain)
    assert 0 < worst <= bound + 1e-6  # > 0: the secure sum really quantized


def test_unknown_dp_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="--dp-kinds"):
        dp_plan(0, True, kinds=("record", "tls"))


def test_secagg_dp_arm_config() -> None:
    base = LeanfedConfig(
        dataset="digits",
        model="mlp",
        num_partitions=1000,
        fraction_train=0.1,
        min_train_nodes=100,
        num_server_rounds=10,
    )
    cfg = dp_arm_config(base, "secagg+dp-client", 8.0, 0.1)
    assert (cfg.privacy_mode, cfg.secure_mode, cfg.secure_neighbors) == ("client", "secagg", 20)
    assert (
        cfg.privacy_noise_multiplier
        == dp_arm_config(base, "client", 8.0, 0.1).privacy_noise_multiplier
    )


def test_dp_plot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from simulations.bench_privacy import plot_dp

    rows = [
        {"dp_kind": kind, "density": 0.1, "epsilon": e, "final_accuracy": a}
        for e, a in ((1.0, 0.5), (8.0, 0.8), (None, 0.9))
        for kind in ("record", "secagg+dp-client")
    ]
    assert plot_dp(rows, tmp_path / "p.png").stat().st_size > 0


def test_every_record_arm_serves_the_same_average_and_the_client_arms_none() -> None:
    from simulations.bench_privacy_dp import RECORD_TUNED

    plan = dp_plan(0, kinds=("record", "client", SECAGG_RECORD))
    assert len(plan) == 8 + 8 + 4
    for cfg, kind, eps in plan:
        if kind == "client":
            assert cfg.aggregation_average == "none"
            continue
        # epsilon = inf and dense too: like-for-like comparisons
        assert cfg.aggregation_average == RECORD_TUNED["aggregation_average"] == "tail"
        assert cfg.aggregation_average_rounds == 3 and cfg.local_batch_size == 128
        if not math.isinf(eps):  # 200 examples a site in the bench: q = 128 / 200
            z = noise_multiplier_for(eps, 128 / 200, 200, 1e-5)
            assert cfg.privacy_noise_multiplier == pytest.approx(z)


def test_record_secagg_weight_cap_caps_nothing_and_shrinks_the_ring() -> None:
    """W_max = the largest site's count rounded up to a power of two: every site keeps its
    weight (the same model, bit for bit, as with the default cap) and replies get smaller."""
    quiet_flower()
    (cfg, _, _), *_ = dp_plan(0, True, (3.0,), (0.1,), (SECAGG_RECORD,))
    cfg = cfg.replace(num_server_rounds=1)
    cap = weight_cap(cfg)
    assert cfg.secure_max_weight == cap < LeanfedConfig().secure_max_weight
    assert cap >= max(_site_sizes(cfg)) > cap // 2 and cap & (cap - 1) == 0
    runs = []
    for c in (cfg, cfg.replace(secure_max_weight=LeanfedConfig().secure_max_weight)):
        grid = InProcessGrid(client_app, c.num_partitions, run_config=c.to_run_config())
        summary = run_federated(grid, c)
        assert summary.final_state is not None
        runs.append((summary.final_state, summary.rounds[0].upload_bytes))
    (capped, up_capped), (default, up_default) = runs
    assert all(torch.equal(capped[k], default[k]) for k in capped)
    assert up_capped < up_default
    default = LeanfedConfig().secure_max_weight  # client-level arms keep the default cap
    client = dp_arm_config(cfg.replace(secure_max_weight=default), "secagg+dp-client", 8.0, 0.1)
    assert client.secure_max_weight == default
