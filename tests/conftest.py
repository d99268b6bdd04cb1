"""Shared pytest setup: Flower environment isolation for every test session."""

from __future__ import annotations

import os
import tempfile

from hypothesis import settings

# Flower must never phone home, check for updates or pip-install at run time in tests.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
# Property tests draw the same examples on every run (the suite must not flake in CI); run
# with HYPOTHESIS_PROFILE=explore locally to search fresh examples.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ray.init() without an address joins the cluster named in /tmp/ray/ray_current_cluster,
# which a `ray start` left behind (or one stopped by PID, whose file stays) would break:
# every Ray instance a test starts without an explicit address is a new local one.
os.environ.setdefault("RAY_ADDRESS", "local")
if "FLWR_HOME" not in os.environ:
    os.environ["FLWR_HOME"] = tempfile.mkdtemp(prefix="leanfed-flwr-home-")
