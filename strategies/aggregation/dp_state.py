"""The resumable state of client-level DP strategies: rounds accounted and the clip norm."""

from __future__ import annotations

import math
from typing import ClassVar

from strategies.privacy.client_dp import AdaptiveClip

__all__ = ["DPStateMixin"]


class DPStateMixin:
    """``dp_state_dict`` / ``load_dp_state_dict`` for `dp.DPSparseFedAvg` and
    `secagg_dp.SecAggDPSparseFedAvg`: the checkpoint keeps {"dp_rounds": int, "clip": float}
    (`server.recorder`), whichever attribute holds the DP clip: ``clip`` in the plain
    strategy, ``dp_clip`` under SecAgg+, where ``clip`` is the secure sum's quantization clip.
    """

    DP_CLIP_ATTR: ClassVar[str] = "clip"  # the attribute holding the DP clip norm C
    dp_rounds: int
    clipper: AdaptiveClip | None

    def dp_state_dict(self) -> dict[str, float | int]:
        """What a resumed run needs: rounds accounted so far and the current clip norm."""
        return {"dp_rounds": self.dp_rounds, "clip": float(getattr(self, self.DP_CLIP_ATTR))}

    def load_dp_state_dict(self, d: dict[str, float | int]) -> None:
        """Restore `dp_state_dict`'s output; a malformed one raises ValueError (one line)."""
        rounds, clip = d.get("dp_rounds"), d.get("clip")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError("DP state: dp_rounds is not a non-negative integer")
        if (
            isinstance(clip, bool)
            or not isinstance(clip, int | float)
            or not (math.isfinite(clip) and clip > 0)
        ):
            raise ValueError("DP state: clip is not a finite positive number")
        self.dp_rounds = rounds
        setattr(self, self.DP_CLIP_ATTR, float(clip))
        if self.clipper is not None:
            self.clipper.clip = float(clip)
