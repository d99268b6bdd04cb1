"""Errors of the deployment-security helpers (all one line, never data)."""

from __future__ import annotations

from server.store import StoreError


class DeployError(RuntimeError):
    """A deployment step failed (bad argument, process died, endpoint never came up)."""


class SignatureError(StoreError):
    """A signature is missing, made by another key, or does not match what it signs."""
