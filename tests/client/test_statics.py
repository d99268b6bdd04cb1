"""Per-process client caches: the parsed config and the model template change no result."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from client.statics import (
    client_round_seed,
    fresh_model,
    run_config,
    seeded_global_rng,
    work_model,
)
from tasks.config import LeanfedConfig
from tasks.plugins import run_model

CFG = LeanfedConfig(dataset="digits", model="mlp", num_partitions=4, seed=5)


def test_run_config_is_parsed_once_and_equals_a_fresh_parse() -> None:
    raw = CFG.to_run_config()
    first = run_config(raw)
    assert first == LeanfedConfig.from_run_config(dict(raw))
    assert run_config(dict(raw)) is first  # a second call reuses the parse
    assert run_config({**raw, "seed": 6}).seed == 6  # another config is parsed on its own


def test_fresh_model_is_a_new_copy_with_the_seeded_init() -> None:
    a = fresh_model(CFG, (64,), 10)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)  # a client trains its copy; the next client must not see it
    b = fresh_model(CFG, (64,), 10)
    ref = run_model(CFG, (64,), 10)
    assert b is not a
    assert b.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(b.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert not torch.equal(a.state_dict()["fc1.weight"], ref.state_dict()["fc1.weight"])


def test_work_model_is_one_instance_reset_to_the_template_in_place() -> None:
    a = work_model(CFG, (64,), 10)
    a.eval()
    for p in a.parameters():
        p.grad = torch.ones_like(p)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)  # the last node trained it; the next call must not see that
    b = work_model(CFG, (64,), 10)
    ref = fresh_model(CFG, (64,), 10)
    assert b is a  # no copy per call
    assert all(torch.equal(b.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert all(p.grad is None for p in b.parameters())
    assert [m.training for m in b.modules()] == [m.training for m in ref.modules()]
    assert work_model(CFG.replace(seed=6), (64,), 10) is not a  # another run: its own


@given(st.integers(0, 2**31), st.integers(1, 1000), st.integers(0, 2**64 - 1))
def test_client_round_seed_is_a_63_bit_function_of_its_inputs(
    seed: int, rnd: int, node: int
) -> None:
    s = client_round_seed(seed, rnd, node)
    assert 0 <= s < 2**63 and s == client_round_seed(seed, rnd, node)
    assert s != client_round_seed(seed, rnd + 1, node)


def test_seeded_global_rng_repeats_draws_and_restores_the_process_stream() -> None:
    torch.manual_seed(0)
    with seeded_global_rng(7):
        first = torch.rand(4)
    after = torch.rand(4)
    torch.rand(100)  # a different history before the next client
    with seeded_global_rng(7):
        again = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(first, again)
    assert torch.equal(after, torch.rand(4))  # the block left the process stream untouched


def _loaded(model: torch.nn.Module, values: dict[str, torch.Tensor], fast: bool) -> list[bytes]:
    from client.statics import load_values

    if fast:
        load_values(model, values)
    else:
        model.load_state_dict(values)
    return [t.detach().numpy().tobytes() for t in model.state_dict().values()]


def test_load_values_is_load_state_dict() -> None:
    torch.manual_seed(0)
    for make in (
        lambda: torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)),
        lambda: torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)),  # slow path
    ):
        src, a, b = make(), make(), make()
        values = {k: v.detach() * 3 + 1 for k, v in src.state_dict().items()}
        assert _loaded(a, values, True) == _loaded(b, values, False)
        assert all(p.requires_grad for p in a.parameters())


def test_load_values_keeps_load_state_dict_errors_and_hooks() -> None:
    from client.statics import load_values

    model = torch.nn.Linear(3, 2)
    good = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):  # a missing key: strict, as load_state_dict
        load_values(model, {"weight": good["weight"]})
    with pytest.raises(RuntimeError):  # a wrong shape
        load_values(model, {**good, "bias": torch.ones(3)})
    seen: list[int] = []
    model.register_load_state_dict_post_hook(lambda m, keys: seen.append(1))
    load_values(model, good)
    assert seen == [1]  # a hooked model is loaded by torch, hooks run
