"""Writes each finished round to the run store, and rebuilds a run's state to resume it.

Called from the runner's ``evaluate_fn`` callback, after aggregation: nothing in the
aggregation maths touches I/O. Each round is one store transaction, so a crash leaves
the store at the last complete round, from which ``resume`` continues.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy

from server.runner import RoundRecord, build_strategy
from server.security.checkpoints import sign_round
from server.security.signing import Signer
from server.store import RunStore, StoreError
from strategies.aggregation.strategy import SparseFedAvg
from strategies.sparse.masks import Mask, layer_densities, mask_from_bytes, mask_to_bytes
from tasks.config import LeanfedConfig

CHECKPOINT_FORMAT = 1


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
    """Everything needed to continue bit-identically after ``server_round``."""
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "round": server_round,
        "state": {k: v.detach().clone() for k, v in state.items()},
        "py_random": random.getstate(),  # Flower samples nodes with `random`
        "torch_rng": torch.get_rng_state(),
    }
    if isinstance(strategy, SparseFedAvg) and strategy.mask is not None:
        payload["mask"] = {k: v.clone() for k, v in strategy.mask.items()}
        payload["mask_version"] = strategy.mask_version
        payload["target_densities"] = dict(strategy.target_densities)
    if isinstance(strategy, SparseFedAvg):  # a stateful aggregation rule's state (FedAdam's m, v)
        payload["rule_state"] = strategy.rule.state_dict()
    return _to_bytes(payload)


@dataclass
class ResumePoint:
    """A run's state after its last committed round."""

    round: int
    state: dict[str, torch.Tensor]
    strategy: Strategy


def load_resume_point(store: RunStore, run_id: str, cfg: LeanfedConfig) -> ResumePoint:
    """Strategy, model and RNG state after the last committed round (RNG restored in place)."""
    latest = store.latest_checkpoint(run_id)
    if latest is None:
        raise StoreError(f"run {run_id} has no committed round to resume from")
    _, data = latest
    ck = _from_bytes(data)
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise StoreError(f"run {run_id}: unsupported checkpoint format {ck.get('format')!r}")
    strategy = build_strategy(cfg)
    if isinstance(strategy, SparseFedAvg) and "mask" in ck:
        strategy.mask = ck["mask"]
        strategy.mask_version = int(ck["mask_version"])
        strategy.target_densities = dict(ck["target_densities"])
    if isinstance(strategy, SparseFedAvg):
        strategy.rule.load_state_dict(ck.get("rule_state", {}))
    random.setstate(_tuplify(ck["py_random"]))
    torch.set_rng_state(ck["torch_rng"])
    return ResumePoint(round=int(ck["round"]), state=ck["state"], strategy=strategy)


def _tuplify(x: Any) -> Any:
    # random.setstate needs tuples; serialization may hand back lists.
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


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
        )


def _event_detail(server_round: int, client: dict[str, Any]) -> dict[str, Any]:
    detail: dict[str, Any] = {"round": server_round}
    task = client.get("metrics", {}).get("task_id")
    if task is not None:
        detail["task_id"] = int(task)
    return detail
