"""A continual client's memory between rounds, kept in Flower ``context.state``.

The stream position, the river drift detectors, the regrowth-policy counter, a bounded
reservoir replay buffer and the frozen-weight protection mask: a few KB plus the replay
examples, in one ConfigRecord and two small ArrayRecords.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.streams import StreamData
from strategies.continual.drift import DriftConfig, DriftMonitor
from strategies.continual.policy import RegrowthPolicy
from strategies.continual.protection import ProtectionMask
from strategies.continual.replay import ReservoirBuffer
from strategies.sparse.masks import Mask, pack_mask, unpack_mask
from tasks.config import LeanfedConfig
from tasks.stream import ClientStream, Experience

STATE_KEY = "leanfed.cl"  # ConfigRecord: stream, drift, policy, replay counters, frozen bits
REPLAY_KEY = "leanfed.cl.replay"  # ArrayRecord: replay x [n, *shape], y [n] (n <= capacity)
ANCHOR_KEY = "leanfed.cl.anchor"  # ArrayRecord: anchor values at frozen positions, 1-D per tensor


@dataclass
class ClientCLState:
    """What a continual client carries from round to round."""

    monitor: DriftMonitor
    policy: RegrowthPolicy
    replay: ReservoirBuffer
    protection: ProtectionMask | None  # None until the first mask is known (dense: never)


def new_state(cfg: LeanfedConfig, node_seed: int) -> ClientCLState:
    drift = DriftConfig(
        detector=cfg.cl_drift_detector,
        grace_period=cfg.cl_drift_grace,
        min_gap=cfg.cl_drift_min_gap,
    )
    return ClientCLState(
        monitor=DriftMonitor(drift),
        policy=RegrowthPolicy(
            drift_fraction=cfg.cl_regrow_drift_fraction, task_fraction=cfg.cl_regrow_task_fraction
        ),
        replay=ReservoirBuffer(cfg.cl_replay_capacity, seed=node_seed % (2**63)),
        protection=None,
    )


def load_state(
    records: RecordDict, cfg: LeanfedConfig, stream: ClientStream, node_seed: int
) -> ClientCLState:
    """Restore stream position and CL state from ``context.state`` (fresh on the first round)."""
    state = new_state(cfg, node_seed)
    rec = records.config_records.get(STATE_KEY)
    if rec is None:
        return state
    d = dict(rec)
    stream.load_state_dict({"position": d["stream.position"], "length": d["stream.length"]})
    state.monitor.load_state_dict(_sub(d, "drift."))
    state.policy.load_state_dict(_sub(d, "policy."))
    replay = _sub(d, "replay.")
    arrays = records.array_records.get(REPLAY_KEY)
    replay["x"] = arrays["x"].numpy() if arrays is not None else None
    replay["y"] = arrays["y"].numpy() if arrays is not None else None
    if replay["x"] is not None:
        replay["x"], replay["y"] = torch.from_numpy(replay["x"]), torch.from_numpy(replay["y"])
    state.replay.load_state_dict(replay)
    names = [str(n) for n in d.get("protect.names", [])]  # type: ignore[union-attr]
    if names:
        frozen: Mask = {}
        for n in names:
            shape = tuple(int(s) for s in d[f"protect.shape:{n}"])  # type: ignore[union-attr]
            frozen[n] = unpack_mask(bytes(d[f"protect.bits:{n}"]), shape)  # type: ignore[arg-type]
        anchors = records.array_records.get(ANCHOR_KEY)
        anchor: dict[str, torch.Tensor] = {}
        for n, f in frozen.items():
            full = torch.zeros(f.shape, dtype=torch.float32)
            if anchors is not None and n in anchors:
                full[f] = torch.from_numpy(anchors[n].numpy()).float()
            anchor[n] = full
        prot = ProtectionMask({n: f.shape for n, f in frozen.items()})
        prot.load_state_dict(
            {
                "experiences": int(d["protect.experiences"]),  # type: ignore[arg-type]
                "frozen": frozen,
                "importance": {},
                "anchor": anchor,
            }
        )
        state.protection = prot
    return state


def save_state(records: RecordDict, stream: ClientStream, state: ClientCLState) -> None:
    """Write the CL state to ``context.state``: one ConfigRecord and two small ArrayRecords.

    Only the anchor values at frozen positions are kept (restore_frozen reads nothing
    else), so the protection costs numel/8 bytes of bits plus 4 bytes per frozen weight.
    """
    rec = ConfigRecord()
    rec["stream.position"] = stream.position
    rec["stream.length"] = stream.length
    for k, v in state.monitor.state_dict().items():
        rec[f"drift.{k}"] = v
    for k, v in state.policy.state_dict().items():
        rec[f"policy.{k}"] = v
    replay = state.replay.state_dict()
    for k in ("version", "capacity", "seen", "rng"):
        rec[f"replay.{k}"] = replay[k]
    if replay["x"] is not None and len(replay["x"]) > 0:
        records.array_records[REPLAY_KEY] = ArrayRecord(
            {"x": replay["x"].contiguous(), "y": replay["y"].contiguous()}
        )
    else:
        records.array_records.pop(REPLAY_KEY, None)
    prot = state.protection
    if prot is not None:
        rec["protect.names"] = list(prot.frozen)
        rec["protect.experiences"] = prot.experiences
        anchors: dict[str, torch.Tensor] = {}
        for n, f in prot.frozen.items():
            rec[f"protect.shape:{n}"] = [int(s) for s in f.shape]
            rec[f"protect.bits:{n}"] = pack_mask(f)
            if n in prot.anchor:
                anchors[n] = prot.anchor[n][f].contiguous()  # [frozen_count]
        records.array_records[ANCHOR_KEY] = ArrayRecord(anchors)
    records.config_records[STATE_KEY] = rec


def _sub(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in d.items() if k.startswith(prefix)}


def current_experience(data: StreamData, records: RecordDict) -> Experience:
    """The experience this node is on (for local evaluation); the first before any training."""
    rec = records.config_records.get(STATE_KEY)
    position = int(rec["stream.position"]) if rec is not None else -1  # type: ignore[arg-type]
    return data.stream.experience(max(0, position))
