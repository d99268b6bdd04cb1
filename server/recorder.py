"""Writes each finished round to the run store, and rebuilds a run's state to resume it.

Called from the runner's ``evaluate_fn`` callback, after aggregation: nothing in the
aggregation maths touches I/O. Each round is one store transaction, so a crash leaves
the store at the last complete round, from which ``resume`` continues.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from server.runner import RoundRecord, _dataset, build_strategy, make_model
from server.security.checkpoints import sign_round
from server.security.signing import Signer
from server.store import CheckpointCorruptError, RunStore, StoreError
from strategies.aggregation.dp_state import DPStateMixin
from strategies.aggregation.strategy import SparseFedAvg
from strategies.sparse.masks import Mask, layer_densities, mask_from_bytes, mask_to_bytes
from tasks.config import LeanfedConfig
from tasks.plugins import run_dataset

# Format 2: no RNG state (the runner derives it from (seed, round)), so identical runs write
# identical bytes. Format 1 (with py_random / torch_rng) is still read; its RNG is ignored.
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def mask_blob(mask: Mask) -> bytes:
    """Bit-packed layers plus their shapes, as stored per round."""
    return _to_bytes(
        {"bits": mask_to_bytes(mask), "shapes": {k: list(v.shape) for k, v in mask.items()}}
    )


def mask_from_blob(blob: bytes) -> Mask:
    d = _from_bytes(blob)
    return mask_from_bytes(d["bits"], {k: tuple(s) for k, s in d["shapes"].items()})


def checkpoint_bytes(
    server_round: int, state: dict[str, torch.Tensor], strategy: Strategy
) -> bytes:
    """Everything needed to continue bit-identically after ``server_round``.

    Only run-owned, seeded state: the RNGs of the next round are derived from (seed, round)
    by the runner, so two identical runs store byte-identical checkpoints.
    """
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "round": server_round,
        "state": {k: v.detach().clone() for k, v in state.items()},
    }
    if isinstance(strategy, DPStateMixin):
        payload["dp"] = strategy.dp_state_dict()
    if isinstance(strategy, SparseFedAvg) and strategy.mask is not None:
        payload["mask"] = {k: v.clone() for k, v in strategy.mask.items()}
        payload["mask_version"] = strategy.mask_version
        payload["target_densities"] = dict(strategy.target_densities)
    if isinstance(strategy, SparseFedAvg):  # a stateful aggregation rule's state (FedAdam's m, v)
        payload["rule_state"] = strategy.rule.state_dict()
    return _to_bytes(payload)


def read_checkpoint(
    data: bytes, where: str, expected_state: Mapping[str, torch.Tensor]
) -> dict[str, Any]:
    """Parse and check one checkpoint's bytes: the ONE place stored checkpoints are read.

    ``expected_state``: the run's model state_dict; names, shapes and dtypes must match it.
    Anything else (bytes that are not a torch file, another layout, wrong shapes, non-finite
    weights, a mask that does not fit) raises CheckpointCorruptError, one line, no data.
    torch.load runs with ``weights_only=True``: a forged pickle cannot run code.
    """
    try:
        ck = _from_bytes(data)
    except Exception as exc:  # torch/pickle/zip raise many types on forged bytes
        raise CheckpointCorruptError(
            f"{where} is unreadable: not a leanfed checkpoint ({type(exc).__name__})"
        ) from None

    def bad(what: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{where} is not a valid leanfed checkpoint: {what}")

    if not isinstance(ck, dict):
        raise bad(f"top level is {type(ck).__name__}, expected a dict")
    if ck.get("format") not in READABLE_FORMATS:
        fmt = ck.get("format")
        shown = fmt if isinstance(fmt, int) else type(fmt).__name__
        raise bad(f"unsupported format {shown} (this leanfed reads {READABLE_FORMATS})")
    rnd = ck.get("round")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 1:
        raise bad("round is not a positive integer")
    state = ck.get("state")
    if not isinstance(state, dict) or set(state) != set(expected_state):
        raise bad("model state does not have the run's model's parameter names")
    for name, ref in expected_state.items():
        t = state[name]
        if not isinstance(t, torch.Tensor) or t.shape != ref.shape or t.dtype != ref.dtype:
            raise bad(f"{name} is not a {ref.dtype} tensor of shape {tuple(ref.shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise bad(f"{name} holds NaN or infinite values")
    if "mask" in ck:
        mask = ck["mask"]
        if not isinstance(mask, dict) or not set(mask) <= set(expected_state):
            raise bad("mask names are not the model's parameters")
        for name, m in mask.items():
            if (
                not isinstance(m, torch.Tensor)
                or m.dtype != torch.bool
                or (m.shape != expected_state[name].shape)
            ):
                raise bad(f"mask of {name} is not a bool tensor of the parameter's shape")
        version = ck.get("mask_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise bad("mask_version is not a non-negative integer")
        dens = ck.get("target_densities")
        if not isinstance(dens, dict) or not all(
            isinstance(v, float | int) and math.isfinite(v) and 0.0 <= v <= 1.0
            for v in dens.values()
        ):
            raise bad("target densities are not numbers in [0, 1]")
    return ck


@dataclass
class ResumePoint:
    """A run's state after its last committed round."""

    round: int
    state: dict[str, torch.Tensor]
    strategy: Strategy


def load_resume_point(store: RunStore, run_id: str, cfg: LeanfedConfig) -> ResumePoint:
    """Strategy and model state after the last committed round, every part checked first.

    Writes nothing: a refused resume leaves the stored run as it was.
    """
    latest = store.latest_checkpoint(run_id)  # SHA-256 checked against the recorded hash
    if latest is None:
        raise StoreError(f"run {run_id} has no committed round to resume from")
    stored_round, data = latest
    where = f"checkpoint of run {run_id} round {stored_round}"
    expected = make_model(cfg, run_dataset(cfg, _dataset)).state_dict()
    ck = read_checkpoint(data, where, expected)
    if ck["round"] != stored_round:
        raise CheckpointCorruptError(
            f"{where} is not a valid leanfed checkpoint: it says round {ck['round']}"
        )
    strategy = build_strategy(cfg)
    if isinstance(strategy, DPStateMixin) and "dp" in ck:
        try:
            if not isinstance(ck["dp"], dict):
                raise ValueError("DP state is not a dict")
            strategy.load_dp_state_dict(ck["dp"])
        except ValueError as exc:  # one line, no data (dp_state.DPStateMixin)
            raise CheckpointCorruptError(
                f"{where} is not a valid leanfed checkpoint: {exc}"
            ) from None
    if isinstance(strategy, SparseFedAvg) and "mask" in ck:
        strategy.mask = ck["mask"]
        strategy.mask_version = int(ck["mask_version"])
        strategy.target_densities = {k: float(v) for k, v in ck["target_densities"].items()}
    if isinstance(strategy, SparseFedAvg):
        rule_state = ck.get("rule_state", {})
        try:
            if not isinstance(rule_state, dict):
                raise TypeError(type(rule_state).__name__)
            strategy.rule.load_state_dict(rule_state)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointCorruptError(
                f"{where} is not a valid leanfed checkpoint: the aggregation rule's state does "
                f"not fit this rule ({type(exc).__name__})"
            ) from None
    return ResumePoint(round=stored_round, state=ck["state"], strategy=strategy)


class StoreRecorder:
    """The ``on_round`` callback: one atomic store write per finished round.

    With a ``signer`` every checkpoint is signed (server.security.checkpoints) over its
    hash, the run's stored config and the round's site list.
    """

    def __init__(self, store: RunStore, run_id: str, signer: Signer | None = None) -> None:
        self.store, self.run_id, self.signer = store, run_id, signer
        self.config = store.get_run(run_id).config if signer is not None else {}

    def __call__(self, rec: RoundRecord, strategy: Strategy, arrays: ArrayRecord) -> None:
        state = dict(arrays.to_torch_state_dict())
        mask = getattr(strategy, "mask", None)
        clients = [dict(c) for c in getattr(strategy, "round_clients", {}).get(rec.round, [])]
        # Stream events the clients reported: detected drift and task switches.
        events = [
            {"kind": kind, "node_id": c["node_id"], "detail": _event_detail(rec.round, c)}
            for kind in ("drift", "task_switch")
            for c in clients
            if c.get("metrics", {}).get(kind)
        ]
        # Federated evaluation replies: each client's own row of the accuracy matrix.
        events += [
            {"kind": "client_eval", "node_id": e["node_id"], "detail": e["metrics"]}
            for e in getattr(strategy, "round_eval_clients", {}).get(rec.round, [])
        ]
        # Rejected evaluate replies and rejected rounds (strategies.aggregation.guard).
        events += [dict(e) for e in getattr(strategy, "round_events", {}).get(rec.round, [])]
        task_accs = {f"task_acc.{j}": a for j, a in enumerate(rec.task_accuracies)}
        checkpoint = checkpoint_bytes(rec.round, state, strategy)
        signature = None
        if self.signer is not None:
            sha = hashlib.sha256(checkpoint).hexdigest()
            signature = sign_round(
                self.signer, self.run_id, rec.round, sha, len(checkpoint), self.config, clients
            )
        self.store.record_round(
            self.run_id,
            rec.round,
            metrics={**rec.metrics, **task_accs, "accuracy": rec.accuracy, "loss": rec.loss},
            upload_bytes=rec.upload_bytes,
            download_bytes=rec.download_bytes,
            wall_s=rec.wall_s,
            density=rec.density,
            client_results=clients,
            mask_blob=None if mask is None else mask_blob(mask),
            layer_densities=None if mask is None else layer_densities(mask),
            checkpoint=checkpoint,
            checkpoint_signature=signature,
            events=events,
            train_loss=rec.train_loss,
            accuracy=rec.accuracy,
            num_accepted=rec.num_accepted,
            degraded=rec.degraded,
        )


def _event_detail(server_round: int, client: dict[str, Any]) -> dict[str, Any]:
    detail: dict[str, Any] = {"round": server_round}
    task = client.get("metrics", {}).get("task_id")
    if task is not None:
        detail["task_id"] = int(task)
    return detail
