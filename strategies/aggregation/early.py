"""Screens a round's train replies as they arrive, so the server's checks overlap the clients.

Flower's ``Strategy.start`` hands ``aggregate_train`` every reply at once, after the
last client finished; decoding and checking 100 replies there leaves the cores the
clients used idle. A grid that sees replies one by one (``InProcessGrid.reply_listeners``)
can pass each to `EarlyScreen.add`, which runs `validate.screen` (decode, value checks,
norm) on it while later clients still compute. ``aggregate_train`` then takes the
results for the replies it is given, only if they were screened against the very global
model and mask of its round (identity), and runs every check in the usual order:
what was screened early is what it would have computed, so the verdicts are unchanged.
Only a payload's own `CodecError`/`ReplyError` is kept (and raised again when taken);
anything else is left to the usual path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from flwr.app import Message, MessageType

from strategies.aggregation.validate import ModelSpec, Screened, screen
from strategies.aggregation.wire import Decoded, ReplyError
from strategies.codec import CodecError
from strategies.sparse.masks import Mask

Basis = tuple[Mapping[str, torch.Tensor], Mask]  # (global sent this round, its mask)
Setup = Callable[[], tuple[Callable[[Message], Decoded], ModelSpec]]
Taken = Callable[[Message], Screened | None]


class EarlyScreen:
    """Screened train replies of the current round, keyed by the reply object."""

    def __init__(self) -> None:
        self._basis: Basis | None = None
        self._decode: Callable[[Message], Decoded] | None = None
        self._spec: ModelSpec | None = None
        # The global in float64 once per round: `update_norm` converts it per reply otherwise
        # (the same conversion, so the same norms).
        self._previous64: dict[str, torch.Tensor] = {}
        # id(reply) -> (the reply, kept so its id stays its own; screened or its error)
        self._done: dict[int, tuple[Message, Screened | CodecError | ReplyError]] = {}
        self.taken = 0  # replies whose early screening a verdict used (all rounds)

    def __len__(self) -> int:
        return len(self._done)

    def clear(self) -> None:
        self._basis, self._decode, self._spec = None, None, None
        self._previous64, self._done = {}, {}

    def add(self, msg: Message, basis: Basis, setup: Setup) -> None:
        """Screen ``msg`` (a train reply) against ``basis``; ``setup`` gives the decoder and
        spec of that basis (called once per basis)."""
        if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
            return
        if self._basis is None or not _same(self._basis, basis):
            self.clear()
            self._basis = basis
            self._decode, self._spec = setup()
            self._previous64 = {k: v.to(torch.float64) for k, v in basis[0].items()}
        assert self._decode is not None and self._spec is not None
        try:
            got: Screened | CodecError | ReplyError = screen(
                self._decode(msg), self._spec, self._previous64
            )
        except (CodecError, ReplyError) as exc:
            got = exc
        except Exception:  # not a payload verdict: left to the usual path, which meets it
            return
        self._done[id(msg)] = (msg, got)

    def take(self, basis: Basis) -> Taken | None:
        """The lookup for ``validate_replies`` if replies were screened against ``basis``."""
        if self._basis is None or not _same(self._basis, basis):
            return None
        done = self._done

        def lookup(msg: Message) -> Screened | None:
            entry = done.get(id(msg))
            if entry is None or entry[0] is not msg:
                return None
            self.taken += 1
            if isinstance(entry[1], Exception):
                raise entry[1]
            return entry[1]

        return lookup


def _same(a: Basis, b: Basis) -> bool:
    return a[0] is b[0] and a[1] is b[1]
