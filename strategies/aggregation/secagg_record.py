"""SecAggRecordDPSparseFedAvg: record-level DP (DP-SGD at each site) under SecAgg+.

Each site runs DP-SGD (Abadi et al. 2016; `client.dp_local`) and accounts its own
epsilon(delta) over every DP-SGD step it took (RDP accountant), exactly as in plain
record-level DP (`dp.DPSparseFedAvg`). Its update goes into the SecAgg+ secure sum
(`secagg.SecAggSparseFedAvg`); its epsilon travels in clear beside the masked vector, in
the only plaintext record a masked reply may hold: MetricRecord "metrics" =
{"dp_epsilon": float, "dp_rounds": int, "num-examples": int}
(`metric_rules.check_epsilon_record`). A site's epsilon is a public function of the public
run config (z, delta, batch, local steps), the rounds it trained and its sampling rate
q = batch / N, which the epsilon alone would reveal anyway; so the site states N and R in
clear and the server recomputes the epsilon (`site_epsilon.SiteEpsilonCheck`, the same
check as plain record mode). Nothing else is in clear; N in clear is not bound to the
weight inside the masked vector (a limitation: see `site_epsilon`). A reply whose plaintext
record breaks the rule is left out of the sum (recovered as a dropout, the reason
recorded); the round stores the LARGEST accepted site epsilon, as the plain record mode
does, and each client row keeps its site's epsilon and rounds.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.serde import metric_record_to_proto

from strategies.aggregation.metric_rules import DP_ROUNDS_KEY, EPSILON_KEY, check_epsilon_record
from strategies.aggregation.secagg import SecAggSparseFedAvg
from strategies.aggregation.secagg_round import Round
from strategies.aggregation.site_epsilon import SiteEpsilonCheck
from strategies.privacy.accountant import SiteAccounting

__all__ = ["SecAggRecordDPSparseFedAvg"]


class SecAggRecordDPSparseFedAvg(SecAggSparseFedAvg):
    """SecAgg+ rounds of DP-SGD sites: the sum stays secret, each site's epsilon is checked."""

    def __init__(self, *, accounting: SiteAccounting, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.delta = accounting.delta
        self.site_check = SiteEpsilonCheck(accounting)
        self.site_record: dict[int, dict[str, int | float]] = {}  # node -> its record, this round

    def _plaintext_problem(self, rs: Round, node: int, msg: Message) -> str | None:
        records = msg.content.metric_records
        size = sum(int(metric_record_to_proto(r).ByteSize()) for r in records.values())
        rs.upload[node] = rs.upload.get(node, 0) + size  # bytes received, counted as sent
        record, problem = check_epsilon_record(records, self.limits.examples_cap(node))
        if problem is None:
            problem = self.site_check.admit(node, rs.round, record)
        if problem is not None:
            return f"plaintext metrics: {problem}"
        self.site_record[node] = record
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """SecAgg+'s round, then the largest site epsilon it received and each site's own."""
        self.site_record = {}
        arrays, metrics = super().aggregate_train(server_round, replies)
        metrics = metrics if metrics is not None else MetricRecord()
        if self.site_record:
            metrics[EPSILON_KEY] = max(float(r[EPSILON_KEY]) for r in self.site_record.values())
        metrics["dp_delta"] = float(self.delta)
        for row in self.round_clients.get(server_round, []):
            node = int(row["node_id"])  # type: ignore[call-overload]
            if node in self.site_record:
                rec = self.site_record[node]
                row["metrics"] = {k: rec[k] for k in (EPSILON_KEY, DP_ROUNDS_KEY)}
        self.last_train_metrics = metrics
        return arrays, metrics
