"""Runs the complete custom-aggregation example from the README, as printed there."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if "def clipped_mean" in b]
    return block


def test_custom_rule_example_is_short_and_runs(capsys) -> None:
    code = _example()
    rule = code[code.index("def clipped_mean") : code.index("cfg = ")]
    assert len([ln for ln in rule.splitlines() if ln.strip()]) <= 30
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    out = capsys.readouterr().out
    acc = float(out.split(":")[-1])
    assert 0.0 <= acc <= 1.0
    # The user's rule really was the one used: the strategy holds it.
    assert namespace["strategy"].rule.fn is namespace["clipped_mean"]  # type: ignore[attr-defined]
