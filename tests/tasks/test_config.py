import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from tasks.config import ConfigError, LeanfedConfig

ROOT = Path(__file__).resolve().parents[2]


def _pyproject_defaults() -> dict:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return flatten_dict(data["tool"]["flwr"]["app"]["config"])


def test_pyproject_defaults_cover_every_field_and_validate() -> None:
    defaults = _pyproject_defaults()
    assert defaults == LeanfedConfig().to_run_config()
    cfg = LeanfedConfig.from_run_config(defaults)
    assert cfg.partition_scheme == "dirichlet"


def test_round_trip() -> None:
    cfg = LeanfedConfig(dst_density=0.2, local_steps=7)
    assert LeanfedConfig.from_run_config(cfg.to_run_config()) == cfg


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"dst.density": 1.5}, "dst.density = 1.5"),
        ({"dst.rule": "magic"}, "dst.rule"),
        ({"local.steps": "ten"}, "local.steps = 'ten': expected an integer"),
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"dst.densty": 0.1}, "unknown run-config key(s) ['dst.densty']"),
        ({"strategy": "flower-fedavg"}, "dst.rule = 'dense'"),
        ({"aggregation.vote": "loudest"}, "aggregation.vote = 'loudest'"),
        ({"aggregation.num-malicious": -1}, "aggregation.num-malicious = -1"),
        ({"aggregation.clip-norm": -0.5}, "aggregation.clip-norm = -0.5"),
        (
            {"privacy.mode": "record", "cl.scenario": "split-mnist"},
            "privacy.mode = 'record' does not support cl.scenario = 'split-mnist'",
        ),
        (
            {"aggregation.rule": "bulyan", "aggregation.num-malicious": 1},
            "needs at least 7 clients per round, the config samples 5",
        ),
        (
            {"aggregation.rule": "krum", "aggregation.num-malicious": 2, "fraction-train": 0.6},
            "needs at least 7 clients per round, the config samples 6",
        ),
    ],
)
def test_bad_values_are_named(override: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        LeanfedConfig.from_run_config(override)
    assert fragment in str(err.value)
