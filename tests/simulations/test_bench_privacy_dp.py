"""The DP arms of the privacy benchmark: calibrated noise, the issue's row schema."""

import math

from simulations.bench_privacy_dp import dp_arm_config, dp_rows
from strategies.privacy.accountant import epsilon
from tasks.config import LeanfedConfig

KEYS = {
    "mode",
    "clients",
    "density",
    "epsilon",
    "delta",
    "final_accuracy",
    "upload_bytes",
    "download_bytes",
    "round_wall_s",
    "seed",
}


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
    dense = dp_arm_config(base, "client", math.inf, 1.0)
    assert dense.privacy_mode == "none" and dense.dst_rule == "dense"


def _seeded(row: dict[str, object]) -> dict[str, object]:
    """What the seed fixes: not timing, nor secagg+dp-client's accuracy (its noise comes
    from each client's OS entropy: the server knows the run seed and could replay it)."""
    drop = {"round_wall_s"}
    if row["mode"] == "secagg+dp-client":
        drop |= {"final_accuracy", "accuracy_per_round"}
    return {k: v for k, v in row.items() if k not in drop}


def test_quick_dp_rows_have_the_schema_and_meet_their_epsilon() -> None:
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
    ]
    for r in rows:
        assert set(r) >= KEYS
        assert 0.0 <= r["final_accuracy"] <= 1.0 and len(r["round_wall_s"]) == 2
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
