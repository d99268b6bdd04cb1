"""SecAggRecordDPSparseFedAvg: record-level DP (DP-SGD at each site) under SecAgg+.

Each site runs DP-SGD (Abadi et al. 2016; `client.dp_local`) and accounts its own
epsilon(delta) over every DP-SGD step it took (RDP accountant), exactly as in plain
record-level DP (`dp.DPSparseFedAvg`). Its update goes into the SecAgg+ secure sum
(`secagg.SecAggSparseFedAvg`); its epsilon travels in clear beside the masked vector, in
the only plaintext record a masked reply may hold: MetricRecord "metrics" =
{"dp_epsilon": float} (`metric_rules.check_epsilon_record`). A site's epsilon is a public
function of the public run config (z, delta, batch), its step count and its sampling rate
q = batch / N, so the server learns q (its partition size, rounded) and nothing else in
clear. A reply whose plaintext record breaks the rule is left out of the sum (recovered as a
dropout, the reason recorded); the round stores the LARGEST accepted site epsilon, as the
plain record mode does, and each client row keeps its site's epsilon.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.serde import metric_record_to_proto

from strategies.aggregation.metric_rules import EPSILON_KEY, check_epsilon_record
from strategies.aggregation.secagg import SecAggSparseFedAvg
from strategies.aggregation.secagg_round import Round

__all__ = ["SecAggRecordDPSparseFedAvg"]


class SecAggRecordDPSparseFedAvg(SecAggSparseFedAvg):
    """SecAgg+ rounds of DP-SGD sites: the sum stays secret, each site's epsilon is checked."""

    def __init__(self, *, delta: float, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.delta = delta
        self.site_epsilon: dict[int, float] = {}  # node -> its epsilon, this round

    def _plaintext_problem(self, rs: Round, node: int, msg: Message) -> str | None:
        records = msg.content.metric_records
        size = sum(int(metric_record_to_proto(r).ByteSize()) for r in records.values())
        rs.upload[node] = rs.upload.get(node, 0) + size  # bytes received, counted as sent
        eps, problem = check_epsilon_record(records)
        if problem is not None:
            return f"plaintext metrics: {problem}"
        self.site_epsilon[node] = eps
        return None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """SecAgg+'s round, then the largest site epsilon it received and each site's own."""
        self.site_epsilon = {}
        arrays, metrics = super().aggregate_train(server_round, replies)
        metrics = metrics if metrics is not None else MetricRecord()
        if self.site_epsilon:
            metrics[EPSILON_KEY] = max(self.site_epsilon.values())
        metrics["dp_delta"] = float(self.delta)
        for row in self.round_clients.get(server_round, []):
            node = int(row["node_id"])  # type: ignore[call-overload]
            if node in self.site_epsilon:
                row["metrics"] = {EPSILON_KEY: self.site_epsilon[node]}
        self.last_train_metrics = metrics
        return arrays, metrics
