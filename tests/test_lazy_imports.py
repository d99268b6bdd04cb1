"""Importing the ClientApp / ServerApp loads no optional heavy library a run may not need.

Every SecAgg+ stage of a deployment starts a fresh `flwr-clientapp` process that imports
`client.app`; dp-accounting, scikit-learn, river and scipy load on the code paths that use
them (accounting an epsilon, splitting a dataset, building a drift detector), not at import.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

LAZY = ("dp_accounting", "sklearn", "river", "scipy", "pandas")

PROBE = """
import sys
import {module}
print(",".join(m for m in {lazy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("module", ["client.app", "server.app"])
def test_app_import_leaves_optional_libraries_unloaded(module: str) -> None:
    # A fresh interpreter: this test process may have imported all of them already.
    probe = PROBE.format(module=module, lazy=LAZY)
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""


PATHS = """
import sys
from strategies.continual.drift import DriftConfig, DriftMonitor
from strategies.privacy.accountant import epsilon
from tasks.datasets import load_dataset

assert "river" not in sys.modules and "dp_accounting" not in sys.modules
monitor = DriftMonitor(DriftConfig(detector="both"))
restored = DriftMonitor.from_state_dict(monitor.state_dict())
assert "river" in sys.modules
print(epsilon(1.0, 0.5, 3, 1e-5) > 0, "dp_accounting" in sys.modules)
load_dataset("digits", seed=0)
print("sklearn.model_selection" in sys.modules)
"""


def test_the_code_paths_that_need_them_still_load_them() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PATHS], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["True", "True", "True"]
