"""Per-client drift monitor: river ADWIN on loss / DDM on errors, with grace period and debounce.

river is a pure-Python streaming library (no Flower, no I/O), so importing it here keeps
``strategies.continual`` free of the Flower runtime as DESIGN.md requires.

Detectors:
- ADWIN (Bifet & Gavaldà 2007, "Learning from time-changing data with adaptive windowing"):
  keeps a variable-length window of the per-batch training loss and signals when two
  sub-windows have means that differ by more than a Hoeffding-style bound (``delta``).
- DDM (Gama et al. 2004, "Learning with drift detection"): tracks the running error rate
  p_i and its std s_i = sqrt(p_i (1 - p_i) / i); signals when
  p_i + s_i > p_min + drift_threshold * s_min.

Around them the monitor adds what a federated client needs:
- a grace period: no drift signal during the first ``grace_period`` updates after creation
  or after a reset (a fresh model's loss falls fast, which ADWIN would read as drift);
- debounce: at most one signal per ``min_gap`` updates, so one shift costs one regrowth;
- known task boundaries are signals too (``task_boundary``), and reset the detectors;
- a small ``state_dict`` (scalars + pickled detectors, a few hundred bytes) that the
  ClientApp keeps in Flower ``context.state`` between rounds.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # river (~0.2 s to import) is loaded only when a detector is built/restored
    from river.drift import ADWIN
    from river.drift.binary import DDM

DETECTORS = ("adwin", "ddm", "both", "none")


_STATE_VERSION = 1


def _river() -> tuple[type[ADWIN], type[DDM]]:
    """river's detector classes, imported on first use (~0.2 s) rather than with this module."""
    from river.drift import ADWIN
    from river.drift.binary import DDM

    return ADWIN, DDM


@dataclass(frozen=True)
class DriftSignal:
    """One regrowth trigger: a detected drift or a known task boundary."""

    kind: str  # "drift" | "task"
    step: int  # monitor update count at which it fired (1-based; 0 = before any update)
    source: str  # "adwin" | "ddm" | "boundary"
    task_id: int | None = None  # set for task boundaries


@dataclass(frozen=True)
class DriftConfig:
    """Detector choice and the knobs of the grace period and debounce."""

    detector: str = "adwin"  # one of DETECTORS; "both" = ADWIN on loss or DDM on error
    grace_period: int = 30  # updates after creation/reset during which nothing is signalled
    min_gap: int = 50  # at most one signal per min_gap updates (debounce)
    adwin_delta: float = 0.002  # ADWIN confidence; smaller = fewer false alarms
    adwin_clock: int = 32  # ADWIN checks for change every `clock` updates (river default)
    ddm_warm_start: int = 30  # DDM ignores the first updates before tracking p_min
    ddm_drift_threshold: float = 3.0  # DDM's 3-sigma rule (Gama et al. 2004)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {self.detector!r}")
        if self.grace_period < 0:
            raise ValueError(f"grace_period must be >= 0, got {self.grace_period}")
        if self.min_gap < 1:
            raise ValueError(f"min_gap must be >= 1, got {self.min_gap}")
        if not 0.0 < self.adwin_delta < 1.0:
            raise ValueError(f"adwin_delta must be in (0, 1), got {self.adwin_delta}")
        if self.adwin_clock < 1:
            raise ValueError(f"adwin_clock must be >= 1, got {self.adwin_clock}")
        if self.ddm_warm_start < 0:
            raise ValueError(f"ddm_warm_start must be >= 0, got {self.ddm_warm_start}")
        if self.ddm_drift_threshold <= 0:
            raise ValueError(f"ddm_drift_threshold must be > 0, got {self.ddm_drift_threshold}")


class DriftMonitor:
    """Feeds one client's training stream to river detectors and emits debounced signals.

    Call ``update(loss, error)`` once per training example or mini-batch (``loss`` the
    batch-mean loss, ``error`` whether the example / batch majority was misclassified),
    and ``task_boundary(task_id)`` when the stream says a new experience starts.
    """

    def __init__(self, config: DriftConfig | None = None) -> None:
        self.config = config if config is not None else DriftConfig()
        self.config.validate()
        self.steps = 0  # total updates seen
        self.last_reset = 0  # self.steps at the last reset (grace counts from here)
        self.last_signal: int | None = None  # self.steps at the last emitted signal
        self.num_signals = 0
        self.num_suppressed = 0  # detections swallowed by grace period / debounce
        self._adwin: ADWIN | None = None
        self._ddm: DDM | None = None
        self._new_detectors()

    def _new_detectors(self) -> None:
        ADWIN, DDM = _river()  # noqa: N806 - river's class names
        c = self.config
        use_adwin = c.detector in ("adwin", "both")
        use_ddm = c.detector in ("ddm", "both")
        # river's own ADWIN grace_period only delays its first check; ours also covers DDM
        # and restarts after every reset, so keep river's at its default.
        self._adwin = ADWIN(delta=c.adwin_delta, clock=c.adwin_clock) if use_adwin else None
        self._ddm = (
            DDM(warm_start=c.ddm_warm_start, drift_threshold=c.ddm_drift_threshold)
            if use_ddm
            else None
        )

    def in_grace(self) -> bool:
        """True while signals are suppressed because of a recent creation or reset."""
        return self.steps - self.last_reset <= self.config.grace_period

    def _debounced(self) -> bool:
        return self.last_signal is not None and self.steps - self.last_signal < self.config.min_gap

    def update(self, loss: float, error: bool) -> DriftSignal | None:
        """Feed one observation; returns a drift signal or None.

        Detectors always see the observation (so they warm up during the grace period);
        only the *signal* is suppressed by grace and debounce.
        """
        if not math.isfinite(loss):
            raise ValueError(f"loss must be finite, got {loss}")
        self.steps += 1
        source: str | None = None
        if self._adwin is not None:
            self._adwin.update(float(loss))
            if self._adwin.drift_detected:
                source = "adwin"
        if self._ddm is not None:
            self._ddm.update(bool(error))
            if self._ddm.drift_detected and source is None:
                source = "ddm"
        if source is None:
            return None
        if self.in_grace() or self._debounced():
            self.num_suppressed += 1
            return None
        self.last_signal = self.steps
        self.num_signals += 1
        return DriftSignal(kind="drift", step=self.steps, source=source)

    def task_boundary(self, task_id: int) -> DriftSignal:
        """A known new experience: always a signal; detectors reset and grace restarts.

        Not debounced (the boundary is certain, not estimated); it does restart the
        debounce window so the detectors cannot fire again on the same shift.
        """
        self.reset()
        self.last_signal = self.steps
        self.num_signals += 1
        return DriftSignal(kind="task", step=self.steps, source="boundary", task_id=task_id)

    def reset(self) -> None:
        """Forget the detectors' statistics and start a new grace period."""
        self.last_reset = self.steps
        self._new_detectors()

    # -- serialization ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Flat dict of scalars and bytes (fits a Flower ConfigRecord as is).

        Pickled river detectors: ~1.6 KB for ADWIN after 5000 updates, ~0.3 KB for DDM.

        Only load states this client wrote itself: unpickling is code execution.
        """
        return {
            "version": _STATE_VERSION,
            **{f"config.{k}": v for k, v in asdict(self.config).items()},
            "steps": self.steps,
            "last_reset": self.last_reset,
            "last_signal": -1 if self.last_signal is None else self.last_signal,
            "num_signals": self.num_signals,
            "num_suppressed": self.num_suppressed,
            "adwin": b"" if self._adwin is None else pickle.dumps(self._adwin),
            "ddm": b"" if self._ddm is None else pickle.dumps(self._ddm),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; raises ValueError on a foreign or mismatched state."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"drift state version {state.get('version')!r} != {_STATE_VERSION}")
        config = _config_from_state(state)
        if config.detector != self.config.detector:
            raise ValueError(
                f"drift state is for detector {config.detector!r}, "
                f"monitor uses {self.config.detector!r}"
            )
        self.config = config
        self.steps = int(state["steps"])
        self.last_reset = int(state["last_reset"])
        last = int(state["last_signal"])
        self.last_signal = None if last < 0 else last
        self.num_signals = int(state["num_signals"])
        self.num_suppressed = int(state["num_suppressed"])
        ADWIN, DDM = _river()  # noqa: N806 - river's class names
        self._adwin = _loads(state["adwin"], ADWIN, "adwin")
        self._ddm = _loads(state["ddm"], DDM, "ddm")

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DriftMonitor:
        """Build a monitor with the stored config and restore its state."""
        monitor = cls(_config_from_state(state))
        monitor.load_state_dict(state)
        return monitor


def _config_from_state(state: dict[str, Any]) -> DriftConfig:
    fields = {k[len("config.") :]: v for k, v in state.items() if k.startswith("config.")}
    try:
        return DriftConfig(**fields)
    except TypeError as err:
        raise ValueError(f"drift state has unknown config fields: {err}") from err


def _loads(data: bytes, expected: type, name: str) -> Any:
    if not data:
        return None
    obj = pickle.loads(data)  # noqa: S301 - client-local state written by this class
    if not isinstance(obj, expected):
        raise ValueError(f"drift state field {name!r} holds {type(obj).__name__}")
    return obj
