"""Plug-ins named in the run config: resolved and their options checked before round 1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.config import ConfigError, LeanfedConfig
from tasks.datasets import DatasetError, load_dataset
from tasks.models import build_model
from tasks.plugins import run_dataset, run_model
from tasks.scenarios import make_scenario

USER = {
    "model": "examples.my_plugins:tiny_net",
    "model.options.hidden": 12,
    "dataset": "examples.my_plugins:blobs",
    "dataset.options.features": 6,
}


def test_user_model_dataset_and_options_round_trip() -> None:
    cfg = LeanfedConfig.from_run_config(USER)
    assert cfg.options("model") == {"hidden": 12}
    assert LeanfedConfig.from_run_config(cfg.to_run_config()) == cfg
    ds = run_dataset(cfg)
    assert ds.input_shape == (6,) and ds.x_train.dtype == np.float32
    model = run_model(cfg, ds.input_shape, ds.num_classes)
    assert model(torch.zeros(2, 6)).shape == (2, 4) and model[1].out_features == 12
    again = run_model(cfg, ds.input_shape, ds.num_classes)  # seeded: same weights
    pairs = zip(model.parameters(), again.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"model.options.depth": 3}, "model.options: tiny_net does not accept options ['depth']"),
        ({"model.options.hidden": "big"}, "model.options.hidden = 'big': expected int"),
        ({"model": "examples.my_plugins:nope"}, "has no attribute 'nope'"),
        ({"model": "no_such_mod_q:f"}, "no module named 'no_such_mod_q'"),
        ({"model": "resnet"}, "model = 'resnet': unknown model"),
        ({"dataset.options.colour": 1}, "dataset.options"),
        ({"cl.options.split": 1}, "cl.options.* need a continual scenario"),
        ({"aggregation.rule": "fedadam", "aggregation.options.beta": 0.9}, "does not accept"),
        (
            {"strategy": "flower-fedavg", "dst.rule": "dense", "aggregation.rule": "fedadam"},
            "aggregation.rule = 'fedadam' does not apply to strategy = 'flower-fedavg'",
        ),
        ({"dst.rule": "no_such_mod_q:f"}, "dst.rule = 'no_such_mod_q:f'"),
        ({"model.options": 1}, "unknown run-config key(s) ['model.options']"),
    ],
)
def test_bad_plugins_fail_in_one_line(override: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        LeanfedConfig.from_run_config({**USER, **override})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_default_model_follows_the_data(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    rows = ["a;b;target"] + [f"{i};{i % 3};{i % 2}" for i in range(20)]
    path.write_text("\n".join(rows))
    cfg = LeanfedConfig.from_run_config(
        {
            "dataset": f"csv:{path}",
            "dataset.options.delimiter": ";",
            "dataset.options.label-column": "target",
        }
    )
    ds = run_dataset(cfg)
    assert ds.input_shape == (2,) and ds.num_classes == 2
    assert type(run_model(cfg, ds.input_shape, ds.num_classes)).__name__ == "MLP"
    assert type(build_model("auto", (2,), 2)).__name__ == "MLP"
    assert type(build_model("auto", (1, 8, 8), 10)).__name__ == "SmallCNN"


def test_dataset_plugin_result_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    import examples.my_plugins as mp

    def bad(seed: int) -> object:
        ds = mp.blobs(seed)
        ds.y_train = ds.y_train + 10  # labels outside [0, num_classes)
        return ds

    monkeypatch.setattr(mp, "bad_blobs", bad, raising=False)
    with pytest.raises(DatasetError, match="y_train must be integer labels in"):
        load_dataset("examples.my_plugins:bad_blobs")


def test_user_stream_with_options() -> None:
    data = load_dataset("examples.my_plugins:blobs")
    sc = make_scenario(
        "examples.my_plugins:two_phase_stream", 3, 0, rounds_per_task=2, data=data, split=1
    )
    assert sc.num_tasks == 2 and sc.task_classes == ((0,), (1, 2, 3))
    cfg = LeanfedConfig.from_run_config(
        {**USER, "cl.scenario": "examples.my_plugins:two_phase_stream", "cl.options.split": 1}
    )
    assert cfg.options("cl") == {"split": 1}
