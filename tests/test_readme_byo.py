"""Runs every "Bring your own" example of the README as printed there (tiny round counts)."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import torch

from server.store import RunStore
from simulations.simulate import build_config, simulate
from strategies.aggregation.merge import ClientUpdate
from strategies.aggregation.rules import RoundInput, build_rule

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
TOML = dict(re.findall(r"```toml\n# bring-your-own: (\S+)\n(.*?)```", README, flags=re.S))
PYTHON = re.findall(r"```python\n(.*?)```", README, flags=re.S)
TINY = {
    "num-server-rounds": 2,
    "num-partitions": 3,
    "min-train-nodes": 2,
    "local.steps": 2,
    "local.batch-size": 8,
}


def _csv(path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    rows = ["age;dose;outcome"]
    for _ in range(60):
        a, d = torch.rand(2, generator=g).tolist()
        rows.append(f"{40 + 40 * a:.2f};{d:.3f};{int(a + d > 1.0)}")
    path.write_text("\n".join(rows) + "\n")


def test_every_example_is_there() -> None:
    assert set(TOML) == {"model", "csv", "stream", "fedadam"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model", "csv", "stream", "fedadam"])
def test_override_file_runs(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _csv(tmp_path / "patients.csv")
    conf = tmp_path / f"{name}.toml"
    conf.write_text(TOML[name].replace("DATA_DIR", str(tmp_path)))
    cfg = build_config(conf, None, TINY)
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    # What each file proves is that its settings run; starting a pool (each worker imports
    # the ClientApp: seconds) is proven once. "stream" (a user's dataset and scenario, two
    # plug-ins from examples/my_plugins.py) runs on a 1-worker pool: the plug-ins resolve
    # and train in a worker process as `leanfed simulate` runs them. The others run every
    # client in this process (--workers 0); a user's model in separate ClientApp processes
    # is also tests/test_flwr_run.py's, and 1 vs 2 vs 0 workers giving the same run is
    # tests/simulations/test_grid.py's.
    run_id = simulate(cfg, url, progress=False, workers=1 if name == "stream" else 0)
    with RunStore(url) as store:
        assert [r.round for r in store.get_rounds(run_id)] == [1, 2]
        latest = store.latest_checkpoint(run_id)
    assert latest is not None
    ck = torch.load(io.BytesIO(latest[1]), weights_only=True)
    if name == "stream":  # a user's stream gets the continual metrics in the summary
        assert "continual: ACC " in capsys.readouterr().out
    if name == "fedadam":  # the strategy's state is in the checkpoint
        assert set(ck["rule_state"]) == {"m", "v"} and ck["rule_state"]["m"]


def test_stateful_rule_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (block,) = [b for b in PYTHON if "class Momentum" in b]
    (tmp_path / "my_rules.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rules", None)
    rule = build_rule("my_rules:Momentum", {"beta": 0.8})
    prev = {"w": torch.zeros(3)}
    ups = [ClientUpdate(1, {"w": torch.ones(3)}, {}, 1)]
    first = rule.aggregate(RoundInput(1, {}, prev, ups))["w"]
    twin = build_rule("my_rules:Momentum", {"beta": 0.8})
    twin.load_state_dict(rule.state_dict())
    a = rule.aggregate(RoundInput(2, {}, {"w": first}, ups))["w"]
    b = twin.aggregate(RoundInput(2, {}, {"w": first}, ups))["w"]
    assert torch.equal(first, torch.ones(3)) and torch.equal(a, b)
    assert torch.allclose(a, torch.full((3,), 1.8))  # v = 0.8 * 1 + 0 ; x = 1 + 0.8


def test_dst_controller_loop() -> None:
    from strategies.sparse.engine import DSTConfig, DSTController

    (block,) = [b for b in PYTHON if "controller = DSTController" in b]
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g))] * 3
    ns = {
        "DSTController": DSTController,
        "DSTConfig": DSTConfig,
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "total_steps": 3,
        "batches": batches,
        "loss_fn": torch.nn.functional.cross_entropy,
    }
    exec(compile(block, "README.md", "exec"), ns)  # noqa: S102
    controller = ns["controller"]
    for name, m in controller.mask.items():  # masked weights are exactly zero
        w = dict(model.named_parameters())[name]
        assert torch.all(w[~m] == 0)
