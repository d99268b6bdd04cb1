"""leanfed export: the condensed global model reproduces the stored model's predictions."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from client.app import app as client_app
from server.app import app as server_app
from server.export import export_model, load_checkpoint_model
from server.store import RunStore
from simulations.cli import app as cli
from simulations.grid import InProcessGrid
from tasks.config import LeanfedConfig
from tasks.datasets import load_dataset

CFG = LeanfedConfig(
    num_server_rounds=2,
    dataset="digits",
    model="cnn",
    num_partitions=4,
    min_train_nodes=2,
    local_steps=3,
    local_batch_size=16,
    dst_density=0.2,
    seed=1,
)


@pytest.fixture(scope="module")
def stored_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'runs.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("LEANFED_DB_URL", url)
    ctx = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=CFG.to_run_config()
    )
    server_app(InProcessGrid(client_app, 4, run_config=CFG.to_run_config()), ctx)
    mp.undo()
    with RunStore(url) as store:
        (run,) = store.list_runs()
    return url, run.id


def test_torchscript_export_reproduces_stored_model(
    stored_run: tuple[str, str], tmp_path: Path
) -> None:
    url, run_id = stored_run
    res = CliRunner().invoke(cli, ["export", run_id[:8], "--out", str(tmp_path), "--db", url])
    assert res.exit_code == 0, res.output
    with RunStore(url) as store:
        model, mask, _, rnd, sha = load_checkpoint_model(store, run_id)
        assert store.checkpoint_sha256(run_id) == (2, sha)
    x = torch.as_tensor(load_dataset("digits", seed=1).x_test, dtype=torch.float32)
    loaded = torch.jit.load(str(tmp_path / "model.pt"))
    with torch.no_grad():
        ref, out = model(x), loaded(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    stored_mask = torch.load(tmp_path / "mask.pt", weights_only=True)
    assert stored_mask.keys() == mask.keys()
    assert all(torch.equal(stored_mask[k], mask[k]) for k in mask)
    card = json.loads((tmp_path / "model_card.json").read_text())
    assert card["round"] == rnd == 2 and card["checkpoint_sha256"] == sha
    assert set(card["layer_density"]) == set(mask)
    assert 0.0 < card["density"] < 0.5
    assert card["inference_flops_masked"] < card["inference_flops_dense"]
    assert card["params_condensed"] < card["params_dense"]
    assert "checkpoint SHA-256" in (tmp_path / "model_card.md").read_text()


def test_onnx_export_of_an_earlier_round(stored_run: tuple[str, str], tmp_path: Path) -> None:
    url, run_id = stored_run
    with RunStore(url) as store:
        res = export_model(store, run_id, tmp_path, round=1, fmt="onnx")
        model, _, _, rnd, _ = load_checkpoint_model(store, run_id, 1)
    assert rnd == 1 and res.card["round"] == 1
    x = torch.as_tensor(load_dataset("digits", seed=1).x_test[:50], dtype=torch.float32)
    sess = ort.InferenceSession(str(res.model_path))
    (out,) = sess.run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    assert abs(out - ref).max() < 1e-5


def test_export_errors_are_one_line(stored_run: tuple[str, str], tmp_path: Path) -> None:
    url, run_id = stored_run
    res = CliRunner().invoke(
        cli, ["export", run_id, "--out", str(tmp_path), "--db", url, "--round", "7"]
    )
    assert res.exit_code == 1
    assert "no checkpoint for round 7" in res.output and "Traceback" not in res.output
