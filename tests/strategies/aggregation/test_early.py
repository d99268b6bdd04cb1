"""Screening train replies as they arrive: the same verdicts, updates and model as without."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from server.runner import build_strategy, make_model, run_federated, sparse_init
from simulations.attacks import attack_app
from simulations.grid import InProcessGrid
from strategies.aggregation.early import EarlyScreen
from strategies.aggregation.strategy import SparseFedAvg
from strategies.aggregation.validate import screen
from strategies.codec import CodecError
from tasks.config import LeanfedConfig
from tasks.datasets import load_dataset

CFG = LeanfedConfig(
    num_server_rounds=2,
    dataset="digits",
    model="mlp",
    num_partitions=6,
    fraction_train=1.0,
    min_train_nodes=2,
    local_steps=2,
    local_batch_size=16,
    dst_density=0.2,
    seed=4,
)


class _Deaf(list):  # type: ignore[type-arg]
    """A listener list that drops every listener: the grid streams replies to no one."""

    def append(self, _item: object) -> None:
        return None


def _run(attack: str, listen: bool) -> tuple[SparseFedAvg, dict[str, torch.Tensor]]:
    strategy = build_strategy(CFG)
    assert isinstance(strategy, SparseFedAvg)
    grid = InProcessGrid(attack_app(attack, 2), CFG.num_partitions, CFG.to_run_config())
    if not listen:
        grid.reply_listeners = _Deaf()
    strategy.mask = sparse_init(make_model(CFG, load_dataset("digits", seed=0)), CFG)
    summary = run_federated(grid, CFG, strategy=strategy)
    assert summary.final_state is not None and not grid.reply_listeners
    return strategy, summary.final_state


# Replies whose payload a verdict reads, over both rounds: all 6 x 2, but "inflate"'s two
# attackers are refused on their metrics before their payload is looked at.
@pytest.mark.parametrize(("attack", "read"), [("shift", 12), ("random-mask", 12), ("inflate", 8)])
def test_screening_as_replies_arrive_changes_no_verdict_and_no_bit(attack: str, read: int) -> None:
    early, state_early = _run(attack, listen=True)
    late, state_late = _run(attack, listen=False)
    assert early.early.taken == read
    assert late.early.taken == 0
    assert _verdicts(early) == _verdicts(late)
    assert early.rejections == late.rejections
    assert early.rejections  # the hostile replies were seen and refused either way
    assert state_early.keys() == state_late.keys()
    assert all(torch.equal(state_early[k], state_late[k]) for k in state_early)


def _verdicts(strategy: SparseFedAvg) -> list[tuple[int, bool, str | None, dict]]:
    # "train_s" is the client's own stopwatch: the one metric two runs do not share.
    return [
        (v.node_id, v.accepted, v.reason, {k: x for k, x in v.metrics.items() if k != "train_s"})
        for v in strategy.last_verdicts["train"]
    ]


def _round() -> tuple[SparseFedAvg, list[Message]]:
    cfg = CFG.replace(num_partitions=2)
    strategy = build_strategy(cfg)
    assert isinstance(strategy, SparseFedAvg)
    model = make_model(cfg, load_dataset("digits", seed=0))
    strategy.mask = sparse_init(model, cfg)
    grid = InProcessGrid("client.app:app", 2, run_config=cfg.to_run_config())
    msgs = list(strategy.configure_train(1, ArrayRecord(model.state_dict()), ConfigRecord(), grid))
    return strategy, list(grid.send_and_receive(msgs))


def test_a_screen_against_another_global_model_is_not_used() -> None:
    strategy, replies = _round()
    assert strategy._global is not None and strategy.mask is not None
    basis = (strategy._global, strategy.mask)
    spec = strategy._spec(*basis)
    screens = EarlyScreen()
    screens.add(replies[0], basis, lambda: (strategy._decoder(basis[1], spec.wire()), spec))
    lookup = screens.take(basis)
    assert lookup is not None
    got = lookup(replies[0])
    want = screen(strategy._decoder(basis[1], spec.wire())(replies[0]), spec, basis[0])
    assert got is not None and got.clean is True and got.norm == want.norm
    assert lookup(replies[1]) is None  # never screened: validated the usual way
    assert screens.take((dict(basis[0]), basis[1])) is None  # an equal copy is not the same


def test_a_payload_error_is_kept_and_raised_when_its_verdict_is_made() -> None:
    strategy, replies = _round()
    assert strategy._global is not None and strategy.mask is not None
    basis = (strategy._global, strategy.mask)
    spec = strategy._spec(*basis)

    def broken(_msg: Message) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        raise CodecError("CRC32 mismatch: payload is corrupt")

    screens = EarlyScreen()
    screens.add(replies[0], basis, lambda: (broken, spec))
    lookup = screens.take(basis)
    assert lookup is not None
    with pytest.raises(CodecError, match="CRC32"):
        lookup(replies[0])
    screens.clear()
    assert len(screens) == 0 and screens.take(basis) is None


def test_any_other_failure_is_left_to_the_usual_path() -> None:
    """A screening that fails for a reason other than the payload keeps nothing (the verdict
    path decodes that reply itself and meets the failure there, as without screening)."""
    strategy, replies = _round()
    assert strategy._global is not None and strategy.mask is not None
    basis = (strategy._global, strategy.mask)
    spec = strategy._spec(*basis)

    def buggy(_msg: Message) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        raise KeyError("not a payload problem")

    screens = EarlyScreen()
    screens.add(replies[0], basis, lambda: (buggy, spec))
    lookup = screens.take(basis)
    assert len(screens) == 0 and lookup is not None and lookup(replies[0]) is None


def test_secure_aggregation_does_not_screen_masked_inputs() -> None:
    strategy = build_strategy(CFG.replace(secure_mode="secagg"))
    assert isinstance(strategy, SparseFedAvg) and not strategy.screens_replies
    assert build_strategy(CFG).screens_replies  # type: ignore[union-attr]
