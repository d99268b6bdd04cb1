"""A record-level DP site's epsilon is recomputed by the server, not taken on trust."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from client.app import app as client_app
from simulations.grid import InProcessGrid, quiet_flower
from strategies.aggregation.metric_rules import (
    DP_RECORD_RULES,
    DP_ROUNDS_KEY,
    EPSILON_KEY,
    WEIGHT_KEY,
    check_epsilon_record,
)
from strategies.aggregation.site_epsilon import SiteEpsilonCheck
from strategies.privacy.accountant import EPSILON_RTOL, SiteAccounting, epsilon
from tests.strategies.aggregation.test_secagg import CFG

ACC = SiteAccounting(noise_multiplier=1.2, batch_size=16, local_steps=3, delta=1e-5)
RECORD = CFG.replace(privacy_mode="record", privacy_noise_multiplier=1.2, num_server_rounds=2)


def _record(n: int, rounds: int, eps: float | None = None) -> dict[str, int | float]:
    value = ACC.site_epsilon(n, rounds) if eps is None else eps
    return {EPSILON_KEY: value, DP_ROUNDS_KEY: rounds, WEIGHT_KEY: n}


def test_one_accounting_function_from_the_run_config() -> None:
    acc = SiteAccounting.of(RECORD)
    assert acc == SiteAccounting(1.2, RECORD.local_batch_size, RECORD.local_steps, 1e-5)
    # q = batch / N, T = rounds x local steps; q capped at 1 for a site smaller than a batch
    assert ACC.site_epsilon(320, 2) == epsilon(1.2, 16 / 320, 6, 1e-5)
    assert ACC.site_epsilon(8, 1) == epsilon(1.2, 1.0, 3, 1e-5)
    assert ACC.site_epsilon(320, 0) == 0.0


def test_an_honest_epsilon_passes_and_a_lie_is_named() -> None:
    honest = ACC.site_epsilon(320, 2)
    assert ACC.problem(honest, 320, 2) is None
    assert ACC.problem(honest * (1 + EPSILON_RTOL / 10), 320, 2) is None  # round-off slack
    for lie in (honest * (1 - 10 * EPSILON_RTOL), honest / 2, 0.0, 2 * honest):
        problem = ACC.problem(lie, 320, 2)
        assert problem is not None and "is not the accountant's" in problem
    # the same epsilon claimed for more data or fewer rounds is a lie too
    assert ACC.problem(honest, 640, 2) is not None
    assert ACC.problem(honest, 320, 1) is not None


def test_round_counts_must_grow_and_stay_within_the_run() -> None:
    check = SiteEpsilonCheck(ACC)
    assert check.admit(7, 1, _record(320, 1)) is None
    assert check.last_rounds == {7: 1}
    # counting round 1 again at round 2 (a smaller epsilon), or counting the future: refused
    again = check.admit(7, 2, _record(320, 1))
    assert again is not None and "must be in (1, 2]" in again
    future = check.admit(7, 2, _record(320, 3))
    assert future is not None and "must be in (1, 2]" in future
    assert check.last_rounds == {7: 1}  # refused counts are not recorded
    # a site not sampled in round 2 reports 2 rounds at round 3; another node is on its own
    assert check.admit(7, 3, _record(320, 2)) is None
    assert check.admit(8, 3, _record(100, 1)) is None
    assert check.last_rounds == {7: 2, 8: 1}
    missing = check.admit(9, 1, {EPSILON_KEY: 1.0, WEIGHT_KEY: 5})
    assert missing is not None and repr(DP_ROUNDS_KEY) in missing


class LiarGrid(InProcessGrid):
    """The real ClientApps; one node's train replies claim half their epsilon (plaintext)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.liar = self.node_ids[0]

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.metadata.message_type == "train" and r.metadata.src_node_id == self.liar:
                metrics = r.content.metric_records["metrics"]
                metrics[EPSILON_KEY] = float(metrics[EPSILON_KEY]) / 2  # type: ignore[arg-type]
        return replies


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_honest_sites_pass_and_a_lying_site_is_rejected_with_its_reason_stored(
    secure: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.app import app as server_app
    from server.security.audit import audit_trail
    from server.store import RunStore

    quiet_flower()
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    monkeypatch.setenv("LEANFED_DB_URL", url)
    cfg = RECORD.replace(secure_mode="secagg") if secure else RECORD
    grid = LiarGrid(client_app, cfg.num_partitions, run_config=cfg.to_run_config())
    ctx = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_run_config()
    )
    server_app(grid, ctx)
    with RunStore(url) as store:
        (run,) = store.list_runs()
        rounds = store.get_rounds(run.id)
        results = store.get_client_results(run.id)
        trail = audit_trail(store, run.id)
    assert run.status == "completed" and len(rounds) == 2
    liar = str(grid.liar)
    for rnd in rounds:  # 4 honest sites of 5 every round; the liar never
        assert rnd.metrics["num_accepted"] == 4 and rnd.metrics["num_rejected"] == 1
    lies = [c for c in results if c.node_id == liar]
    honest = [c for c in results if c.node_id != liar]
    assert len(lies) == 2 and len(honest) == 8
    assert all(c.accepted and c.reason is None for c in honest)
    for c in lies:  # why, in the store's rejection trail; no claim of the liar is kept
        assert not c.accepted and c.metrics == {}
        assert c.reason is not None and "is not the accountant's" in c.reason
    # ... and in the audit trail `runs show` prints: one rejection per round, the liar's
    rejected = [e for e in trail if e.what == "rejected"]
    assert [e.round for e in rejected] == [1, 2]
    assert all(f"node {liar}: " in e.detail and "accountant's" in e.detail for e in rejected)
    # the round's epsilon is the largest of the honest sites' (every site trains every round)
    for rnd in rounds:
        mine = [c for c in honest if c.round == rnd.round]
        assert rnd.metrics[EPSILON_KEY] == max(c.metrics[EPSILON_KEY] for c in mine)
        assert all(c.metrics[DP_ROUNDS_KEY] == rnd.round for c in mine)


_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
    st.text(max_size=4),
    st.lists(st.floats(allow_nan=False), max_size=3),
    st.none(),
)
_KEYS = st.sampled_from([*DP_RECORD_RULES, "train_loss", "metrics", ""])


@settings(max_examples=300, deadline=None)
@given(
    records=st.dictionaries(
        st.sampled_from(["metrics", "loss", "config"]),
        st.dictionaries(_KEYS, _VALUES, max_size=5),
        max_size=3,
    ),
    cap=st.integers(min_value=1, max_value=10**7),
)
def test_fuzzed_plaintext_records_never_raise_and_pass_only_when_well_formed(
    records: dict[str, dict[str, Any]], cap: int
) -> None:
    kept, problem = check_epsilon_record(records, cap)
    if problem is None:
        assert set(records) == {"metrics"} and set(kept) == set(DP_RECORD_RULES)
        assert isinstance(kept[EPSILON_KEY], float | int) and math.isfinite(kept[EPSILON_KEY])
        assert isinstance(kept[DP_ROUNDS_KEY], int) and kept[DP_ROUNDS_KEY] >= 1
        assert isinstance(kept[WEIGHT_KEY], int) and 1 <= kept[WEIGHT_KEY] <= cap
    else:
        assert kept == {} and "\n" not in problem


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=10**6),
    rounds=st.integers(min_value=1, max_value=50),
    server_round=st.integers(min_value=1, max_value=50),
    eps=st.floats(min_value=0.0, max_value=1e6),
)
def test_fuzzed_well_formed_records_are_judged_without_raising(
    n: int, rounds: int, server_round: int, eps: float
) -> None:
    check = SiteEpsilonCheck(ACC)
    problem = check.admit(3, server_round, _record(n, rounds, eps))
    honest = rounds <= server_round and ACC.problem(eps, n, rounds) is None
    assert (problem is None) == honest
    assert check.last_rounds == ({3: rounds} if honest else {})
