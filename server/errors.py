"""leanfed's user-facing error classes, and one-line descriptions that never quote data.

In server/ because both the ServerApp (storing why a run failed) and the CLI edge in
simulations/ describe errors the same way, and simulations may import server, not reverse.
"""

from __future__ import annotations

import traceback

from server.security.errors import DeployError
from server.store.errors import StoreError
from strategies.codec import CodecError
from strategies.sparse.masks import MaskError
from tasks.config import ConfigError
from tasks.datasets import DatasetError
from tasks.models import ModelError
from tasks.stream import StreamError

# leanfed's own error classes: their messages name what was wrong, never data.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DatasetError,
    ModelError,
    StreamError,
    MaskError,
    CodecError,
    StoreError,
    DeployError,
)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def where_raised(exc: BaseException) -> str:
    """``file.py:LINE in function`` of the innermost frame: a place, never a value."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "unknown location"
    last = frames[-1]
    return f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name}"


def describe(exc: BaseException) -> str:
    """One line about an error: the message of leanfed's own errors, else type and place only
    (the message of an unexpected exception may quote data)."""
    if isinstance(exc, USER_ERRORS):
        return first_line(exc)
    return f"unexpected {type(exc).__name__} at {where_raised(exc)}"
