"""The continual client round: stream position, drift, regrowth, protection, replay per round.

One call of :func:`continual_round` is one federated round of a client whose data is a
stream of experiences (Avalanche-style, Lomonaco et al. 2021). Between rounds everything
the client remembers lives in Flower ``context.state`` (see :func:`load_state` /
:func:`save_state`): the stream position, the river drift detectors, the regrowth-policy
counter, a bounded reservoir replay buffer and the frozen-weight protection mask, a few
KB plus the replay examples.

Per round:

1. advance the stream to the experience active in this round (``boundary_round``;
   asynchronous arrival supported, several boundaries may be crossed at once);
2. on a task switch: offer the finished experiences to the replay buffer, consolidate
   protection on the received global model (PackNet magnitude freezing, Mallya &
   Lazebnik 2018; never-drop protection as in NISPA, Gurbuz & Dovrolis 2022), tell the
   drift monitor (a known boundary is a signal) and spend the policy's task budget on a
   RigL regrowth (magnitude drop, dense-gradient grow on the NEW data; Evci et al. 2020)
   that never drops a frozen weight;
3. train ``local.steps`` steps on the current experience mixed with replayed examples;
   the drift monitor sees the per-step loss of the current data; a detected drift buys
   the policy's drift budget; FedDST's scheduled readjustment (``local.readjust_fraction``)
   is the third producer. At most one topology change per round, so the server sees one
   mask per client per round; a client that regrew sends its mask, which the server's
   consensus vote then takes in.

Scenario streams are built by ``tasks.scenarios.make_scenario`` (the default; another
factory can be installed with :func:`register_scenario_builder`); a deployed client
reads its own ``FileStream``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch import nn
from torch.nn import functional as F  # noqa: N812

from client.data import Options, shared_dataset
from client.local import RoundOutcome, readjust_fraction, round_controller
from strategies.continual.drift import DriftConfig, DriftMonitor, DriftSignal
from strategies.continual.policy import RegrowthPolicy, gradient_grow_scores, merge_budgets
from strategies.continual.protection import ProtectionMask
from strategies.continual.replay import ReservoirBuffer
from strategies.sparse.engine import DSTController
from strategies.sparse.flops import train_flops
from strategies.sparse.masks import Mask, pack_mask, unpack_mask
from tasks.config import LeanfedConfig
from tasks.plugins import frozen_options
from tasks.stream import ClientStream, Experience, FileStream, StreamError

STATE_KEY = "leanfed.cl"  # ConfigRecord: stream, drift, policy, replay counters, frozen bits
REPLAY_KEY = "leanfed.cl.replay"  # ArrayRecord: replay x [n, *shape], y [n] (n <= capacity)
ANCHOR_KEY = "leanfed.cl.anchor"  # ArrayRecord: anchor values at frozen positions, 1-D per tensor
SCORE_BATCHES = 1  # mini-batches of new data for RigL's dense-gradient grow scores


class ScenarioLike(Protocol):
    """What the client reads from ``tasks.scenarios.Scenario``."""

    @property
    def num_classes(self) -> int: ...
    @property
    def input_shape(self) -> tuple[int, ...]: ...
    def stream(self, client: int) -> ClientStream: ...


# make_scenario(name, num_clients, seed, *, rounds_per_task, async_max_delay, dataset=...)
ScenarioBuilder = Callable[..., ScenarioLike]
_builder: list[ScenarioBuilder] = []


def register_scenario_builder(builder: ScenarioBuilder) -> None:
    """Install the scenario factory (``tasks.scenarios.make_scenario``)."""
    _builder[:] = [builder]
    _scenario.cache_clear()


@lru_cache(maxsize=4)
def _scenario(
    name: str,
    num_clients: int,
    seed: int,
    rounds_per_task: int,
    delay: int,
    dataset: str,
    data_options: Options = (),
    options: Options = (),
) -> ScenarioLike:
    if not _builder:
        from tasks.scenarios import make_scenario  # default: the shipped scenarios

        _builder.append(make_scenario)
    return _builder[0](
        name,
        num_clients,
        seed,
        rounds_per_task=rounds_per_task,
        async_max_delay=delay,
        data=shared_dataset(dataset, seed, data_options),
        **dict(options),
    )


@dataclass(frozen=True)
class StreamData:
    """A node's stream and the task shape its model is built for."""

    stream: ClientStream
    num_classes: int
    input_shape: tuple[int, ...]


def sync_boundaries(cfg: LeanfedConfig, length: int) -> list[int]:
    """Round in which experience t starts: 1 + t * cl.rounds-per-task."""
    return [1 + t * cfg.cl_rounds_per_task for t in range(length)]


def client_stream(cfg: LeanfedConfig, node_config: dict[str, Any]) -> StreamData:
    """This node's stream: ``FileStream`` from node-config "stream-dir", else its scenario share.

    A deployed node may pass "stream-boundaries" ("1,6,11": the round each experience
    starts) and "num-classes"; by default experiences start every cl.rounds-per-task
    rounds and the class count is that of the run's dataset.
    """
    if "stream-dir" in node_config:
        probe = FileStream(str(node_config["stream-dir"]))
        if "stream-boundaries" in node_config:
            raw = str(node_config["stream-boundaries"])
            try:
                bounds = [int(b) for b in raw.split(",") if b.strip()]
            except ValueError as err:
                raise StreamError(f"stream-boundaries {raw!r}: expected '1,6,11'") from err
        else:
            bounds = sync_boundaries(cfg, len(probe))
        stream = FileStream(str(node_config["stream-dir"]), boundaries=bounds)
        first = stream.experience(0)
        if "num-classes" in node_config:
            num_classes = int(node_config["num-classes"])
        else:
            ds = shared_dataset(cfg.dataset, cfg.seed, frozen_options(cfg, "dataset"))
            num_classes = int(ds.num_classes)
        return StreamData(stream, num_classes, tuple(int(s) for s in first.x.shape[1:]))
    if "partition-id" not in node_config:
        raise ValueError("node_config needs 'partition-id' (simulation) or 'stream-dir' (deployed)")
    pid = int(node_config["partition-id"])
    n = int(node_config.get("num-partitions", cfg.num_partitions))
    if not 0 <= pid < n:
        raise ValueError(f"partition-id {pid} out of range for {n} partitions")
    sc = _scenario(
        cfg.cl_scenario,
        n,
        cfg.seed,
        cfg.cl_rounds_per_task,
        cfg.cl_async_max_delay,
        cfg.dataset,
        frozen_options(cfg, "dataset"),
        frozen_options(cfg, "cl"),
    )
    return StreamData(sc.stream(pid), int(sc.num_classes), tuple(sc.input_shape))


# -- state in context.state ------------------------------------------------------------


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


# -- the round ---------------------------------------------------------------------------


def replay_share(batch_size: int, finished: int) -> int:
    """Replayed examples per batch: k/(k+1) of it after k finished experiences, >= 1 new.

    Each experience seen so far gets about the same share of every batch (class-balanced
    experience replay; a fixed 50/50 mix over-weights the newest classes in a single-head
    class-incremental model, the recency bias of Wu et al. 2019).
    """
    if finished <= 0 or batch_size <= 1:
        return 0
    return min(batch_size - 1, round(batch_size * finished / (finished + 1)))


class _Batches:
    """Seeded epochs of mini-batches over one experience (as in ``client.trainer``)."""

    def __init__(self, exp: Experience, size: int, generator: torch.Generator) -> None:
        self.x, self.y, self.gen = exp.x, exp.y, generator
        self.size = min(size, len(exp))
        self.perm = torch.randperm(len(exp), generator=generator)
        self.cursor = 0

    def next(self, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        bs = min(self.size if size is None else size, len(self.y))
        if self.cursor + bs > len(self.y):  # epoch boundary: fresh permutation
            self.perm = torch.randperm(len(self.y), generator=self.gen)
            self.cursor = 0
        idx = self.perm[self.cursor : self.cursor + bs]  # [bs]
        self.cursor += bs
        return self.x[idx], self.y[idx]


def _regrow(
    model: nn.Module,
    controller: DSTController,
    fraction: float,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    protection: ProtectionMask | None,
) -> dict[str, int]:
    """RigL regrowth: magnitude drop (never a frozen weight), grow by |dense grad| on batches."""
    scores = gradient_grow_scores(model, F.cross_entropy, batches, list(controller.mask))
    protected = None if protection is None else protection.forbidden_drop()
    return controller.regrow(fraction, scores, protected=protected)


def continual_round(
    model: nn.Module,
    cfg: LeanfedConfig,
    server_round: int,
    mask: Mask | None,
    data: StreamData,
    records: RecordDict,
    generator: torch.Generator,
    node_seed: int,
) -> RoundOutcome:
    """One continual round of this client; CL state is read from and written to ``records``.

    ``mask`` is the received global mask (None: the dense baseline, no regrowth and no
    protection, replay and drift monitoring still run). Metrics in ``RoundOutcome.extra``:
    drift, task_switch (0/1), task_id, replay_size, frozen, train_flops.
    """
    stream = data.stream
    state = load_state(records, cfg, stream, node_seed)
    old = stream.position
    entered = stream.advance_to_round(server_round)
    if stream.position < 0:
        raise StreamError(f"round {server_round}: no experience has started on this node yet")
    exp = stream.current()
    # A switch = this node moved on from an experience; the first one (old = -1 -> 0) is not.
    task_switch = bool(entered) and stream.position > 0
    finished = list(range(max(old, 0), stream.position)) if task_switch else []
    for t in finished:  # the reservoir sees every example of the stream exactly once
        done = stream.experience(t)
        state.replay.add(done.x, done.y)

    if mask is not None:
        if state.protection is None:
            state.protection = ProtectionMask.for_mask(mask)
        prot = state.protection
        if task_switch and cfg.cl_freeze_fraction > 0:
            # Anchor = the received GLOBAL model: every client crossing in this round
            # freezes the same values, so the federated average leaves them unchanged.
            weights = {n: p.detach() for n, p in model.state_dict().items() if n in mask}
            prot.consolidate(weights, mask, cfg.cl_freeze_fraction)
        # The server's consensus may have deactivated a frozen weight: the mask wins.
        prot.frozen = {n: f & mask[n] for n, f in prot.frozen.items()}
    protection = state.protection if mask is not None else None
    any_frozen = protection is not None and protection.frozen_count() > 0

    optimizer, controller = round_controller(model, cfg, mask, generator)
    bs = cfg.local_batch_size
    new_data = _Batches(exp, bs, generator)
    n_rep = replay_share(bs, stream.position) if len(state.replay) > 0 else 0

    def mixed_batch() -> tuple[torch.Tensor, torch.Tensor, int]:
        xb, yb = new_data.next(bs - n_rep)
        n_new = len(yb)
        if n_rep:
            xb, yb = state.replay.mix(xb, yb, n_rep, generator)
        return xb, yb, n_new

    regrew, dropped, grown, score_batches, drift = False, 0, 0, 0, False

    def regrow_now(fraction: float, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One topology change on ``batches``: RigL scores, frozen weights never dropped."""
        nonlocal regrew, score_batches, dropped, grown
        changed = _regrow(model, controller, fraction, batches, protection)
        regrew, score_batches = True, len(batches)
        dropped, grown = changed["dropped"], changed["grown"]

    signal: DriftSignal | None = None
    if task_switch:
        signal = state.monitor.task_boundary(exp.task_id)
    scheduled = None if mask is None else readjust_fraction(cfg, server_round)
    if mask is not None and task_switch:
        fraction = merge_budgets(scheduled, state.policy.budget(signal))
        if fraction is not None:
            regrow_now(fraction, [new_data.next() for _ in range(SCORE_BATCHES)])

    midpoint = max(1, cfg.local_steps // 2)
    total_loss, seen = 0.0, 0
    model.train()
    for step in range(cfg.local_steps):
        if mask is not None and not regrew and scheduled is not None and step == midpoint:
            # FedDST's scheduled readjustment, halfway so regrown weights train before upload.
            regrow_now(scheduled, [mixed_batch()[:2] for _ in range(SCORE_BATCHES)])
        xb, yb, n_new = mixed_batch()
        optimizer.zero_grad(set_to_none=True)
        logits = model(xb)  # [b, classes]
        per_example = F.cross_entropy(logits, yb, reduction="none")  # [b]
        loss = per_example.mean()
        loss.backward()
        if any_frozen and protection is not None:
            protection.zero_frozen_grads(model)
        controller.after_backward()
        controller.step()
        if any_frozen and protection is not None:
            protection.restore_frozen(model)
        total_loss += float(loss.detach())
        seen += len(yb)
        # The monitor watches the NEW data only: replayed examples are not the stream.
        with torch.no_grad():
            new_loss = float(per_example[:n_new].mean())
            new_err = float((logits[:n_new].argmax(1) != yb[:n_new]).float().mean()) > 0.5
        fired = state.monitor.update(new_loss, new_err)
        if fired is not None:
            drift = True
            if mask is not None and not regrew:
                fraction = merge_budgets(scheduled, state.policy.budget(fired))
                if fraction is not None:
                    regrow_now(fraction, [new_data.next() for _ in range(SCORE_BATCHES)])

    final_mask = None if mask is None else {k: v.clone() for k, v in controller.mask.items()}
    flops = train_flops(
        model,
        exp.x[:1],
        final_mask,
        seen + score_batches * bs,
        dense_grad_steps=score_batches,
        batch_size=bs,
    )
    save_state(records, stream, state)
    frozen = 0 if protection is None else protection.frozen_count()
    return RoundOutcome(
        loss=total_loss / max(1, cfg.local_steps),
        num_examples=len(exp) + len(state.replay),
        steps=cfg.local_steps,
        regrew=regrew,
        dropped=dropped,
        grown=grown,
        mask=final_mask,
        extra={
            "drift": int(drift),
            "task_switch": int(task_switch),
            "task_id": int(exp.task_id),
            "experience": int(stream.position),
            "replay_size": len(state.replay),
            "frozen": frozen,
            "train_flops": int(flops),
        },
    )


def current_experience(data: StreamData, records: RecordDict) -> Experience:
    """The experience this node is on (for local evaluation); the first before any training."""
    rec = records.config_records.get(STATE_KEY)
    position = int(rec["stream.position"]) if rec is not None else -1  # type: ignore[arg-type]
    return data.stream.experience(max(0, position))


def node_seed(cfg: LeanfedConfig, node_id: int) -> int:
    """Per-node seed folded into int64 range (real Flower node ids are 64-bit)."""
    return (cfg.seed * 1_000_003 + node_id * 7919) % (2**63)


__all__: Sequence[str] = (
    "ANCHOR_KEY",
    "REPLAY_KEY",
    "STATE_KEY",
    "StreamData",
    "client_stream",
    "continual_round",
    "current_experience",
    "load_state",
    "node_seed",
    "register_scenario_builder",
    "replay_share",
    "save_state",
)
