"""Every override file under simulations/conf/ parses into a valid config."""

from pathlib import Path

import pytest

from simulations.simulate import build_config

CONF = Path(__file__).resolve().parents[2] / "simulations" / "conf"


def test_there_are_conf_files() -> None:
    assert len(list(CONF.glob("*.toml"))) >= 3


@pytest.mark.parametrize("path", sorted(CONF.glob("*.toml")), ids=lambda p: p.name)
def test_conf_file_is_valid(path: Path) -> None:
    cfg = build_config(path, None, {})
    assert cfg.num_server_rounds >= 1
