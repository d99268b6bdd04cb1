"""The fuzz campaign of ``leanfed bench robustness``: hostile replies and hostile payloads.

Replies: rounds of a federation of honest nodes plus hostile ones (every category of
`simulations.hostile`) against both strategies, SparseFedAvg and the dense baseline
(Flower's FedAvg behind the same validation), train and evaluate. Each round is also
aggregated by a copy of the strategy that sees ONLY the honest replies; the round is
"poisoned" when the two disagree (global model, or the aggregated metrics other than
the byte and rejection counts) or the global model is not finite.

Payloads: `simulations.fuzz_codec.codec_campaign` on leanfed's MNIST CNN.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from simulations.fuzz_codec import codec_campaign
from simulations.hostile import (
    EVALUATE_CATEGORIES,
    PARTITION,
    SPARSE,
    SPARSE_ONLY,
    TRAIN_MAKERS,
    Made,
    honest_evaluate_reply,
    honest_train,
    honest_train_reply,
    hostile_evaluate,
    initial_state,
)
from strategies import codec
from strategies.aggregation.counting import ByteCountingFedAvg
from strategies.aggregation.strategy import SparseFedAvg
from strategies.aggregation.validate import ReplyLimits, Verdict

NODES = 12
HOSTILE_TRAIN = 5  # of the 12 sampled nodes, this many reply with an attack per round
HOSTILE_EVALUATE = 3
VOLATILE = ("upload_bytes", "num_rejected")  # metrics that differ with hostile replies around


@dataclass
class Tally:
    """Counts of one campaign (the results.json "fuzz" fields, plus accepted attacks)."""

    tried: int = 0
    crashes: int = 0
    nonfinite_globals: int = 0
    honest_rejected: int = 0
    rejected_without_reason: int = 0
    hostile_accepted: int = 0
    by_category: dict[str, int] = field(default_factory=dict)

    def fields(self) -> dict[str, int]:
        return {
            "tried": self.tried,
            "crashes": self.crashes,
            "nonfinite_globals": self.nonfinite_globals,
            "honest_rejected": self.honest_rejected,
            "rejected_without_reason": self.rejected_without_reason,
        }


class _Grid(Grid):
    """Node ids for sampling; replies are built by the campaign, not pulled."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def set_run(self, run: object) -> None:  # pragma: no cover - unused
        pass

    @property
    def run(self) -> object:  # type: ignore[override]
        return None

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: object) -> list[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: object) -> list[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: object, *, timeout: float | None = None) -> list[Message]:
        raise NotImplementedError


@contextlib.contextmanager
def task_identity() -> Iterator[None]:
    """Flower sets these when a ServerApp starts; instruction Messages need them."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class Federation:
    """One strategy ("sparse" or "dense") with NODES nodes and its own global model."""

    def __init__(self, kind: str, seed: int) -> None:
        rng = random.Random(seed)
        self.kind = kind
        self.nodes = [rng.getrandbits(64) | (1 << 63) for _ in range(NODES)]
        self.grid = _Grid(self.nodes)
        self.held: dict[int, dict] = {n: {} for n in self.nodes}
        limits = ReplyLimits(partition_sizes=dict.fromkeys(self.nodes, PARTITION))
        sampling = dict(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=1,
            min_evaluate_nodes=1,
            min_available_nodes=1,
        )
        self.strategy: SparseFedAvg | ByteCountingFedAvg
        if kind == "sparse":
            self.strategy = SparseFedAvg(
                density=0.5,
                distribution="uniform",
                sparse_keys=SPARSE,
                seed=seed,
                limits=limits,
                **sampling,  # type: ignore[arg-type]
            )
        else:
            self.strategy = ByteCountingFedAvg(limits=limits, **sampling)
        self.arrays = ArrayRecord(initial_state(seed))
        self.round = 0

    def _forget(self) -> None:
        # Keep the strategy small: it is deep-copied every round for the honest twin.
        s = self.strategy
        s.rejections.clear()
        for book in (s.round_clients, s.round_eval_clients, s.round_events):
            book.clear()
        s.bytes_log = {k: v for k, v in s.bytes_log.items() if k == self.round}

    def play(self, rng: random.Random, train: list[str], evaluate: list[str], tally: Tally) -> None:
        """One round: honest replies from most nodes, the given attacks from the others."""
        self.round += 1
        msgs = list(
            self.strategy.configure_train(self.round, self.arrays, ConfigRecord(), self.grid)
        )
        rng.shuffle(msgs)
        groups: list[Made] = []
        for i, instr in enumerate(msgs):
            ctx = honest_train(self.kind, instr, self.held[int(instr.metadata.dst_node_id)], rng)
            if i < len(train):
                groups.append(TRAIN_MAKERS[train[i]](ctx))
                tally.by_category[train[i]] = tally.by_category.get(train[i], 0) + 1
            else:
                groups.append([(honest_train_reply(ctx), True)])
        rng.shuffle(groups)
        self._forget()
        out = self._aggregate(
            "train",
            [m for g in groups for m in g],
            tally,
            lambda s, r: s.aggregate_train(self.round, r),
        )
        if out is not None and out[0] is not None:
            self.arrays = out[0]
        ev = list(
            self.strategy.configure_evaluate(self.round, self.arrays, ConfigRecord(), self.grid)
        )
        groups = []
        for i, instr in enumerate(ev):
            if self.kind == "sparse":  # every node decodes (and so holds) what it was sent
                held = self.held[int(instr.metadata.dst_node_id)]
                payload = codec.from_arrayrecord(instr.content.array_records["arrays"])
                held["mask"] = codec.decode_with(payload, held.get("mask"))[1]
            if i < len(evaluate):
                groups.append(hostile_evaluate(evaluate[i], instr, rng))
            else:
                groups.append([(honest_evaluate_reply(instr, rng), True)])
        rng.shuffle(groups)
        self._aggregate(
            "evaluate",
            [m for g in groups for m in g],
            tally,
            lambda s, r: (None, s.aggregate_evaluate(self.round, r)),
        )

    def _aggregate(self, phase: str, replies: Made, tally: Tally, call) -> tuple | None:  # type: ignore[no-untyped-def]
        """Aggregate all replies and, on a copy, only the honest ones; tally the differences."""
        tally.tried += sum(1 for _, honest in replies if not honest)
        twin = copy.deepcopy(self.strategy)
        try:
            out = call(self.strategy, [m for m, _ in replies])
        except Exception:  # noqa: BLE001 - counting crashes is the point
            tally.crashes += 1
            self.strategy = twin
            return None
        verdicts: list[Verdict] = self.strategy.last_verdicts[phase]
        for (_, honest), v in zip(replies, verdicts, strict=True):
            tally.honest_rejected += honest and not v.accepted
            tally.hostile_accepted += (not honest) and v.accepted
            tally.rejected_without_reason += (not v.accepted) and not v.reason
        ref = call(twin, [m for m, honest in replies if honest])
        if _poisoned(out, ref):
            tally.nonfinite_globals += 1
        return out


def _state(arrays: ArrayRecord | None) -> dict[str, torch.Tensor] | None:
    return None if arrays is None else dict(arrays.to_torch_state_dict())


def _poisoned(out: tuple, ref: tuple) -> bool:
    """Global model non-finite, or model/metrics differ from the honest-only aggregate."""
    got, want = _state(out[0]), _state(ref[0])
    if got is not None and not all(bool(torch.isfinite(v).all()) for v in got.values()):
        return True
    if (got is None) != (want is None):
        return True
    if (
        got is not None
        and want is not None
        and (set(got) != set(want) or any(not torch.equal(got[k], want[k]) for k in got))
    ):
        return True
    return _metrics(out[1]) != _metrics(ref[1])


def _metrics(m: MetricRecord | None) -> dict[str, object]:
    return {} if m is None else {k: v for k, v in m.items() if k not in VOLATILE}


def reply_campaign(seed: int, rounds: int) -> Tally:
    """`rounds` rounds, alternating 2 sparse : 1 dense, attack categories cycled."""
    rng = random.Random(seed)
    tally = Tally()
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)  # one INFO line per rejected reply otherwise
    try:
        with task_identity():
            feds = {"sparse": Federation("sparse", seed), "dense": Federation("dense", seed + 1)}
            for r in range(rounds):
                fed = feds["dense" if r % 3 == 2 else "sparse"]
                cats = [c for c in TRAIN_MAKERS if fed.kind == "sparse" or c not in SPARSE_ONLY]
                train = [cats[(r + i) % len(cats)] for i in range(HOSTILE_TRAIN)]
                evaluate = [
                    EVALUATE_CATEGORIES[(r + i) % len(EVALUATE_CATEGORIES)]
                    for i in range(HOSTILE_EVALUATE)
                ]
                fed.play(rng, train, evaluate, tally)
    finally:
        flwr_log.setLevel(level)
    return tally


def run_fuzz_campaign(seed: int, quick: bool) -> dict:
    """The fuzz and codec halves of ``leanfed bench robustness`` (results.json fields).

    Full: 1,250 rounds x 8 hostile replies = 10,000 hostile replies, 100,000 codec inputs.
    Quick: 24 rounds (192 hostile replies), 1,500 codec inputs.
    """
    rounds, inputs = (24, 1_500) if quick else (1_250, 100_000)
    tally = reply_campaign(seed, rounds)
    return {"fuzz": tally.fields(), "codec": codec_campaign(seed, inputs)}
