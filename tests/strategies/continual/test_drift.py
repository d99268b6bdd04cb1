"""Drift monitor: river detectors on synthetic abrupt shifts, grace period, debounce, state."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.continual.drift import DriftConfig, DriftMonitor, DriftSignal


def loss_series(change_points: list[int], n: int, seed: int = 0) -> np.ndarray:
    """Gaussian losses whose mean flips 0.2 <-> 0.8 at each change point (abrupt shifts)."""
    rng = np.random.default_rng(seed)
    means = np.full(n, 0.2)
    level = 0.2
    for i in range(n):
        if i in change_points:
            level = 1.0 - level
        means[i] = level
    return means + rng.normal(0.0, 0.05, size=n)


def run(monitor: DriftMonitor, losses: np.ndarray, errors: np.ndarray | None = None) -> list[int]:
    steps = []
    for i, loss in enumerate(losses):
        err = bool(errors[i]) if errors is not None else False
        sig = monitor.update(float(loss), err)
        if sig is not None:
            steps.append(sig.step)
    return steps


def test_adwin_quiet_before_change_and_fires_within_k_steps() -> None:
    losses = loss_series([1000], 2000)
    mon = DriftMonitor(DriftConfig(detector="adwin", grace_period=30, min_gap=50))
    steps = run(mon, losses)
    assert steps, "ADWIN missed a 0.2 -> 0.8 loss shift"
    # No false alarm on the stationary part; detection within K = 64 updates
    # (ADWIN checks every clock = 32 updates, so at most 2 checks late).
    assert steps[0] > 1000
    assert steps[0] - 1000 <= 64
    assert len(steps) == 1
    assert mon.num_signals == 1


def test_ddm_on_error_rate_shift() -> None:
    # Seeded: DDM's 3-sigma rule still false-alarms on some Bernoulli(0.1) draws (e.g. seed 1
    # at update 264); the series is fixed so the test is exact.
    rng = np.random.default_rng(0)
    errors = np.concatenate([rng.random(600) < 0.1, rng.random(400) < 0.6])
    # DDM is jumpy right after its warm start (p_min, s_min estimated from ~30 errors);
    # a 100-update grace period is exactly what keeps that out of the regrowth trigger.
    mon = DriftMonitor(DriftConfig(detector="ddm", grace_period=100, min_gap=50))
    sigs = []
    for i, e in enumerate(errors):
        s = mon.update(0.5, bool(e))
        if s is not None:
            sigs.append(s)
            assert s.source == "ddm" and s.kind == "drift"
        if i < 600:
            assert s is None, f"DDM false alarm at step {i + 1}"
    assert sigs and 600 < sigs[0].step <= 640


def test_no_signal_during_grace_period() -> None:
    # The shift lands at update 100, inside a 300-update grace period: ADWIN detects it
    # but the monitor swallows it, and nothing fires after grace (the window adapted).
    losses = loss_series([100], 600)
    mon = DriftMonitor(DriftConfig(grace_period=300, min_gap=1))
    assert run(mon, losses) == []
    assert mon.num_suppressed >= 1
    # The same series with no grace period does fire, right after the change.
    free = DriftMonitor(DriftConfig(grace_period=0, min_gap=1))
    first = run(free, losses)[0]
    assert 100 < first <= 164


def test_grace_boundary_is_exact() -> None:
    mon = DriftMonitor(DriftConfig(grace_period=5))
    for _ in range(5):
        mon.update(0.1, False)
        assert mon.in_grace()
    mon.update(0.1, False)  # update 6: first one allowed to signal
    assert not mon.in_grace()


def test_debounce_keeps_exactly_the_greedy_thinning_of_raw_detections() -> None:
    changes = list(range(150, 3000, 150))  # a shift every 150 updates
    losses = loss_series(changes, 3000, seed=2)
    raw = run(DriftMonitor(DriftConfig(grace_period=0, min_gap=1)), losses)
    assert len(raw) >= 15  # ADWIN sees (nearly) every shift
    gap = 400
    expected: list[int] = []
    for t in raw:  # at most one signal per `gap` updates, first come first served
        if not expected or t - expected[-1] >= gap:
            expected.append(t)
    got = run(DriftMonitor(DriftConfig(grace_period=0, min_gap=gap)), losses)
    assert got == expected
    assert all(b - a >= gap for a, b in zip(got, got[1:], strict=False))
    assert len(got) < len(raw)


def test_task_boundary_signals_resets_and_restarts_grace() -> None:
    mon = DriftMonitor(DriftConfig(grace_period=10, min_gap=5))
    for _ in range(20):
        mon.update(0.3, False)
    sig = mon.task_boundary(3)
    assert sig == DriftSignal(kind="task", step=20, source="boundary", task_id=3)
    assert mon.in_grace() and mon.last_reset == 20
    # A second boundary right away is still a signal: boundaries are certain, not debounced.
    assert mon.task_boundary(4).task_id == 4
    assert mon.num_signals == 2


def test_state_dict_roundtrip_continues_identically() -> None:
    losses = loss_series([700, 1400], 2100, seed=3)
    errors = np.random.default_rng(3).random(2100) < np.where(np.arange(2100) < 700, 0.1, 0.5)
    cfg = DriftConfig(detector="both", grace_period=20, min_gap=30)
    a = DriftMonitor(cfg)
    run(a, losses[:500], errors[:500])
    state = a.state_dict()
    size = sum(len(v) for v in state.values() if isinstance(v, bytes))
    assert size < 8_000  # small enough for Flower context.state
    b = DriftMonitor.from_state_dict(state)
    assert run(a, losses[500:], errors[500:]) == run(b, losses[500:], errors[500:])
    assert a.state_dict()["steps"] == b.state_dict()["steps"] == 2100


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="detector"):
        DriftMonitor(DriftConfig(detector="page-hinkley"))
    with pytest.raises(ValueError, match="min_gap"):
        DriftConfig(min_gap=0).validate()
    with pytest.raises(ValueError, match="finite"):
        DriftMonitor().update(float("nan"), False)
    state = DriftMonitor(DriftConfig(detector="adwin")).state_dict()
    with pytest.raises(ValueError, match="detector"):
        DriftMonitor(DriftConfig(detector="ddm")).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        DriftMonitor().load_state_dict({**state, "version": 99})


def test_detector_none_never_signals_drift() -> None:
    mon = DriftMonitor(DriftConfig(detector="none", grace_period=0))
    assert run(mon, loss_series([100], 400)) == []
    assert mon.task_boundary(1).kind == "task"


def test_state_is_flat_scalars_and_bytes() -> None:
    # Flower's ConfigRecord holds only scalars, str and bytes (no nested dicts).
    state = DriftMonitor(DriftConfig(detector="both")).state_dict()
    assert all(isinstance(v, int | float | str | bytes) for v in state.values())
    assert state["config.detector"] == "both"
    with pytest.raises(ValueError, match="unknown config"):
        DriftMonitor.from_state_dict({**state, "config.colour": "red"})
