"""The server's check of a record-level DP site's reported epsilon: recomputed, not trusted.

A site's epsilon(delta) is a public function of the run config (z, batch, local steps,
delta) and two numbers the site reports beside it: its example count N and the rounds it
has trained, R. The server recomputes it with the very function the site used
(`strategies.privacy.accountant.SiteAccounting`) and refuses a reply whose epsilon differs
beyond `EPSILON_RTOL`. R itself is bounded by what the server saw: at most the current
round (a site cannot have trained more rounds than there were) and more than the R of the
node's last reply that passed this check (it trained in that round, so every later count
is larger): a site cannot shrink its epsilon by under-counting its rounds. N is capped by
the reply validator (the configured cap, and the node's partition size where the server
knows it). LIMITATION: where the partition size is unknown (a real deployment), a site
could over-report N (q = batch / N smaller, epsilon smaller) and stay consistent; nothing
public binds N. The last counts live in this process only: after a resume the lower bound
restarts at 0 (looser, never refusing an honest site).
"""

from __future__ import annotations

from collections.abc import Mapping

from strategies.aggregation.metric_rules import DP_ROUNDS_KEY, EPSILON_KEY, WEIGHT_KEY
from strategies.privacy.accountant import SiteAccounting

__all__ = ["SiteEpsilonCheck"]


class SiteEpsilonCheck:
    """Per run: each node's last checked round count, and the check of its next reply."""

    def __init__(self, accounting: SiteAccounting) -> None:
        self.accounting = accounting
        self.last_rounds: dict[int, int] = {}  # node -> R of its last reply that passed

    def admit(self, node: int, server_round: int, metrics: Mapping[str, int | float]) -> str | None:
        """Why this train reply's epsilon is refused, or None (then R is recorded).

        ``metrics``: the reply's metrics, already checked against their rules
        (`metric_rules`: types and ranges), so only the accounting is judged here.
        """
        missing = [k for k in (EPSILON_KEY, DP_ROUNDS_KEY, WEIGHT_KEY) if k not in metrics]
        if missing:
            return f"record-level DP reply lacks {', '.join(repr(k) for k in missing)}"
        rounds = int(metrics[DP_ROUNDS_KEY])
        last = self.last_rounds.get(node, 0)
        if not last < rounds <= server_round:
            return (
                f"metric {DP_ROUNDS_KEY!r} = {rounds} must be in ({last}, {server_round}]: more "
                "than the node's last count, at most the round"
            )
        problem = self.accounting.problem(
            float(metrics[EPSILON_KEY]), int(metrics[WEIGHT_KEY]), rounds
        )
        if problem is not None:
            return problem
        self.last_rounds[node] = rounds
        return None
