"""Byzantine client wrapper: each attack's maths, and real attacked replies through the Grid."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from server.runner import build_strategy, make_model, sparse_init
from simulations.attacks import INFLATE, SCALE, attack_app, attack_update
from simulations.grid import InProcessGrid
from strategies.aggregation.wire import decode_reply
from tasks.config import LeanfedConfig
from tasks.datasets import load_dataset


def test_attack_maths_on_kept_coordinates() -> None:
    g = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([0.5]), "n": torch.tensor(3)}
    v = {"w": torch.tensor([1.5, 0.0, 2.0, 0.0]), "b": torch.tensor([1.0]), "n": torch.tensor(4)}
    m = {"w": torch.tensor([True, False, True, False])}
    gen = torch.Generator().manual_seed(0)
    shift, _ = attack_update("shift", g, v, m, gen)
    assert shift["w"].tolist() == [1.0 + SCALE, 0.0, 3.0 + SCALE, 0.0]
    assert shift["b"].tolist() == [0.5 + SCALE] and int(shift["n"]) == 4  # ints untouched
    flip, _ = attack_update("sign-flip", g, v, m, gen)
    assert flip["w"].tolist() == [1.0 - SCALE * 0.5, 0.0, 3.0 + SCALE, 0.0]
    inflate, _ = attack_update("inflate", g, v, m, gen)
    assert inflate["w"].tolist() == [0.5, 0.0, 4.0, 0.0]
    rand, rmask = attack_update("random-mask", g, v, m, gen)
    assert int(rmask["w"].sum()) == 2 and torch.equal(rand["w"] != 0, rmask["w"])
    assert torch.equal(rand["b"], v["b"])
    with pytest.raises(ValueError, match="unknown attack"):
        attack_update("nice", g, v, m, gen)
    with pytest.raises(ValueError, match="unknown attack"):
        attack_app("nice", 1)


@pytest.mark.parametrize("attack", ["shift", "inflate", "random-mask"])
def test_attacking_node_sends_a_valid_hostile_reply(attack: str) -> None:
    cfg = LeanfedConfig(
        dataset="digits", model="mlp", num_partitions=2, fraction_train=1.0, local_steps=1
    )
    ds = load_dataset("digits", seed=0)
    model = make_model(cfg, ds)
    strategy = build_strategy(cfg)
    strategy.mask = sparse_init(model, cfg)  # type: ignore[union-attr]
    grid = InProcessGrid(attack_app(attack, 1), 2, run_config=cfg.to_run_config())
    bad = next(n for n in grid.node_ids if grid.partition_of(n) == 0)
    arrays = ArrayRecord(model.state_dict())
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    replies = {int(r.metadata.src_node_id): r for r in grid.send_and_receive(msgs)}
    assert strategy.mask is not None
    honest = decode_reply(replies[grid.node_ids[1]], strategy.mask)
    hostile = decode_reply(replies[bad], strategy.mask)
    if attack == "inflate":
        assert hostile.num_examples >= INFLATE  # x 1000 of at least one example
    key = "fc1.weight"
    if attack == "random-mask":
        assert not torch.equal(hostile.mask[key], strategy.mask[key])
        assert int(hostile.mask[key].sum()) == int(honest.mask[key].sum())
    if attack == "shift":
        kept = hostile.mask[key]
        diff = hostile.values[key][kept] - model.state_dict()[key][kept]
        assert torch.allclose(diff, torch.full_like(diff, SCALE), atol=1e-4)
    # The run's real strategy accepts the hostile reply (it is well-formed) and merges it.
    new, metrics = strategy.aggregate_train(1, list(replies.values()))
    assert new is not None and metrics is not None and metrics["num_accepted"] == 2
