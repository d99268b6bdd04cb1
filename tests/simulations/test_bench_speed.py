import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from simulations.bench_speed import FULL, QUICK, REQUIRED_KEYS, VARIANTS
from simulations.cli import app
from simulations.speed_variants import CSRLinear, to_csr
from tasks.models import build_model


@pytest.mark.timeout(300)  # ~40 s on an idle 2-core machine; generous cap for loaded CI
def test_quick_run_writes_valid_results(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["bench", "speed", "--out", str(tmp_path), "--quick"])
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "results.json").read_text())
    per_model = len(QUICK.batches) * len(QUICK.threads)
    assert len(rows) == len(QUICK.tasks) * per_model * (1 + 3 * len(QUICK.densities))
    for r in rows:
        assert set(REQUIRED_KEYS) <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["latency_ms"] > 0 and r["latency_ms_iqr"] >= 0 and r["cpu_ms"] >= 0
        assert (r["train_round_s"] is None) == (r["variant"] == "csr")
        assert r["density"] == (1.0 if r["variant"] == "dense" else 0.5)
        assert r["model"] == r["task"]
        assert (r["distribution"] is None) == (r["variant"] == "dense")
        # a null value or a limit of the variant is explained in the row, never silent
        if r["train_round_s"] is None or r["task"] == "gnn":
            assert isinstance(r["note"], str) and r["note"]
        else:
            assert r["note"] is None
    assert {r["task"] for r in rows} == {"cnn", "transformer", "gnn"}
    assert {r["variant"] for r in rows} == set(VARIANTS)
    assert {(r["batch"], r["threads"]) for r in rows} == {(1, 1), (8, 1)}
    for task in ("cnn", "transformer", "gnn"):
        by = {r["variant"]: r for r in rows if r["task"] == task and r["batch"] == 1}
        # the three sparse variants compute the same function: identical test accuracy
        assert by["masked"]["accuracy"] == by["condensed"]["accuracy"] == by["csr"]["accuracy"]
        assert by["condensed"]["params"] < by["dense"]["params"]
    assert (tmp_path / "latency_vs_accuracy.png").stat().st_size > 1000
    assert "| cnn | condensed | 0.5 |" in (tmp_path / "results.md").read_text()
    assert "| gnn | condensed | 0.5 |" in (tmp_path / "results.md").read_text()


def test_full_plan_and_csr_variant() -> None:
    assert FULL.densities == (0.5, 0.2, 0.1) and FULL.batches == (1, 64)
    assert FULL.threads == (1, 2) and FULL.tasks == ("cnn", "transformer", "gnn")
    # one budget per task, the same for dense and sparse models; regrowth ends early
    assert len(FULL.epochs) == len(FULL.lr) == len(FULL.distribution) == len(FULL.tasks)
    assert FULL.end_fraction <= 0.5
    model = build_model("mlp", (1, 4, 4), 3).eval()
    mask = {
        n: torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.3
        for n, p in model.named_parameters()
        if p.dim() == 2
    }
    csr = to_csr(model, mask)
    assert isinstance(csr.fc1, CSRLinear) and csr.fc1.weight.layout == torch.sparse_csr
    assert csr.fc1.weight._nnz() == int(mask["fc1.weight"].sum())
    x = torch.randn(5, 1, 4, 4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in mask:
                p.mul_(mask[n])
        assert torch.allclose(csr(x), model(x), atol=1e-5)


def test_condensed_transformer_variant_drops_whole_heads() -> None:
    from simulations.speed_variants import variants
    from strategies.sparse.condensed_transformer import CondensedAttention
    from strategies.sparse.engine import DSTConfig, DSTController

    model = build_model("transformer", (1, 6, 6), 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = DSTConfig(rule="channel", density=0.2, distribution="uniform")
    ctl = DSTController(model, opt, cfg, 10, generator=torch.Generator().manual_seed(0))
    group = variants(model, model, ctl.mask)
    attn = group["condensed"].get_submodule("encoder.layers.0.self_attn")
    assert isinstance(attn, CondensedAttention) and attn.heads == 1  # max(1, round(0.2 * 4))
    assert not any(p.requires_grad for m in group.values() for p in m.parameters())
    assert any(p.requires_grad for p in model.parameters())  # the trained model untouched
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():
        ref = group["masked"](x)
        for v in ("csr", "condensed"):
            assert torch.allclose(group[v](x), ref, atol=1e-5), v
