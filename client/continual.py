"""The continual client round: stream position, drift, regrowth, protection, replay per round.

One call of :func:`continual_round` is one federated round of a client whose data is a
stream of experiences (Avalanche-style, Lomonaco et al. 2021). Between rounds everything
the client remembers lives in Flower ``context.state`` (``client.cl_state``): the stream
position, the river drift detectors, the regrowth-policy counter, a bounded reservoir
replay buffer and the frozen-weight protection mask, a few KB plus the replay examples.

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

Which stream a node trains on (its scenario share or its own ``FileStream``) is
``client.streams``. Every name callers imported from this module is re-exported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from flwr.app import RecordDict
from torch import nn
from torch.nn import functional as F  # noqa: N812

from client.cl_state import (
    ANCHOR_KEY,
    REPLAY_KEY,
    STATE_KEY,
    ClientCLState,
    current_experience,
    load_state,
    new_state,
    save_state,
)
from client.local import RoundOutcome, readjust_fraction, round_controller
from client.streams import (
    ScenarioBuilder,
    ScenarioLike,
    StreamData,
    client_stream,
    register_scenario_builder,
    sync_boundaries,
)
from strategies.continual.drift import DriftSignal
from strategies.continual.policy import gradient_grow_scores, merge_budgets
from strategies.continual.protection import ProtectionMask
from strategies.sparse.engine import DSTController
from strategies.sparse.flops import train_flops
from strategies.sparse.masks import Mask
from tasks.config import LeanfedConfig
from tasks.stream import Experience, StreamError

SCORE_BATCHES = 1  # mini-batches of new data for RigL's dense-gradient grow scores


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


def node_seed(cfg: LeanfedConfig, node_id: int) -> int:
    """Per-node seed folded into int64 range (real Flower node ids are 64-bit)."""
    return (cfg.seed * 1_000_003 + node_id * 7919) % (2**63)


__all__: Sequence[str] = (
    "ANCHOR_KEY",
    "REPLAY_KEY",
    "STATE_KEY",
    "ClientCLState",
    "ScenarioBuilder",
    "ScenarioLike",
    "StreamData",
    "client_stream",
    "continual_round",
    "current_experience",
    "load_state",
    "new_state",
    "node_seed",
    "register_scenario_builder",
    "replay_share",
    "save_state",
    "sync_boundaries",
)
