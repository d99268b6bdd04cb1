"""The fuzz campaign behind `leanfed bench robustness`: exact schema, every target met (quick)."""

from __future__ import annotations

from simulations.fuzz_campaign import run_fuzz_campaign


def test_quick_campaign_schema_and_targets() -> None:
    out = run_fuzz_campaign(seed=0, quick=True)
    assert set(out) == {"fuzz", "codec"}
    assert set(out["fuzz"]) == {
        "tried",
        "crashes",
        "nonfinite_globals",
        "honest_rejected",
        "rejected_without_reason",
    }
    assert set(out["codec"]) == {"tried", "foreign_exceptions", "max_decode_ms", "max_decode_mb"}
    assert out["fuzz"]["tried"] == 24 * 8
    assert out["codec"]["tried"] == 1_500
    fuzz = out["fuzz"]
    assert fuzz["crashes"] == fuzz["nonfinite_globals"] == 0
    assert fuzz["honest_rejected"] == fuzz["rejected_without_reason"] == 0
    assert out["codec"]["foreign_exceptions"] == 0
    # Memory is a count of bytes, not a timing: decoding stays under 2x the CNN's 0.83 MB.
    assert 0 < out["codec"]["max_decode_mb"] <= 2 * 0.827688
