"""Fixtures shared by the simulation tests: the issue-10 row schema of the privacy bench."""

from __future__ import annotations

import pytest

# Issue 10: every privacy-bench row has at least these keys.
PRIVACY_ROW_KEYS = frozenset(
    {
        "mode",
        "clients",
        "density",
        "epsilon",
        "delta",
        "final_accuracy",
        "upload_bytes",
        "download_bytes",
        "round_wall_s",
        "seed",
    }
)


@pytest.fixture
def privacy_row_keys() -> frozenset[str]:
    """The keys issue 10 asks of every `leanfed bench privacy` row."""
    return PRIVACY_ROW_KEYS
