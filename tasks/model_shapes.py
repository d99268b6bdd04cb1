"""Model errors and input-shape reading shared by the reference models (tasks.models, tasks.gnn)."""

from __future__ import annotations

from strategies.plugins import PluginError


class ModelError(PluginError):
    """A model name is unknown or does not fit the input shape."""


def image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    """(C, H, W) of an image input; a flat (F,) input is read as a 1 x 1 x F image."""
    if len(input_shape) == 3:
        c, h, w = input_shape
        return int(c), int(h), int(w)
    if len(input_shape) == 1:
        return 1, 1, int(input_shape[0])
    raise ModelError(f"{model}: expected input_shape (C, H, W) or (F,), got {input_shape}")
