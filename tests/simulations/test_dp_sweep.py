"""The DP tuning sweep scores on the validation split and calibrates as the bench does."""

import math

import pytest

from simulations.dp_sweep import SETTINGS, VALIDATION, sweep_arms
from strategies.privacy.accountant import noise_multiplier_for


def test_sweep_arms_hold_out_the_validation_split_and_calibrate_for_the_smaller_sites() -> None:
    arms = sweep_arms(["prev", "all-sites"])
    assert [(a[3], a[2]) for a in arms] == [
        ("prev", 8.0),
        ("prev", math.inf),
        ("all-sites", 8.0),
        ("all-sites", math.inf),
    ]
    for cfg, kind, eps, _ in arms:
        assert kind == "record" and cfg.validation_size == VALIDATION == 400
        assert cfg.dst_density == 0.1
        assert cfg.privacy_mode == ("none" if math.isinf(eps) else "record")
    # 3,600 training examples over 20 IID sites: 180 each, so q = 32 / 180 over 200 steps
    z = noise_multiplier_for(8.0, 32 / 180, 200, 1e-5)
    assert arms[0][0].privacy_noise_multiplier == pytest.approx(z)
    assert arms[2][0].fraction_train == 1.0 and arms[0][0].fraction_train == 0.5


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(KeyError):
        sweep_arms(["no-such-setting"])
    assert "prev" in SETTINGS


def test_the_bench_runs_the_chosen_setting_and_keeps_the_client_arms() -> None:
    from simulations.bench_privacy_dp import (
        RECORD_MODEL,
        RECORD_TUNED,
        record_base,
        session14_base,
    )
    from simulations.dp_sweep import CHOSEN

    assert SETTINGS[CHOSEN] == (RECORD_TUNED, RECORD_MODEL)
    record, old = record_base(0), session14_base(0)
    assert record.validation_size == 0  # the published run trains on all 4,000, tests on 1,000
    for key, value in RECORD_TUNED.items():
        assert getattr(record, key) == value
    assert record.options("model") == RECORD_MODEL
    assert old.fraction_train == 0.5 and old.options("model") == {}  # session 14, unchanged


def test_the_session_17_pick_calibrates_for_batch_128_and_averages_the_tail() -> None:
    from simulations.dp_sweep import CHOSEN

    assert CHOSEN == "scatter-cnn-b128-tail3"
    eight, inf = sweep_arms([CHOSEN])
    for cfg in (eight[0], inf[0]):  # both arms serve the same average
        assert (cfg.aggregation_average, cfg.aggregation_average_rounds) == ("tail", 3)
        assert cfg.local_batch_size == 128 and cfg.model == "scatter-cnn"
    # 180 examples a site on the validation split: q = 128 / 180 over 20 x 10 steps
    z = noise_multiplier_for(8.0, 128 / 180, 200, 1e-5)
    assert eight[0].privacy_noise_multiplier == pytest.approx(z)
    assert inf[0].privacy_mode == "none"
