"""Export a stored run's global model: condensed TorchScript or ONNX, its mask, a model card.

``export_model`` is the one function that writes an export (the CLI and, later, signing call
it). It loads a round's checkpoint from the run store (SHA-256 verified by the store),
rebuilds the run's model, applies the consensus mask, ``condense``s it and writes:

- ``model.pt`` (TorchScript, ``torch.jit.load``) or ``model.onnx`` (opset 17, batch axis
  dynamic; ``onnxruntime.InferenceSession``): input ``x`` [B, *input_shape] float32, output
  ``logits`` [B, classes]. Loading needs torch (or onnxruntime) only, never leanfed.
- ``mask.pt``: the full-shape bool consensus mask (``torch.load(..., weights_only=True)``).
- ``model_card.json`` / ``model_card.md``: run, round, the checkpoint's SHA-256, density per
  layer, accuracy of the exported model on the run's test set, FLOPs, parameters, file hashes.

The GNN is refused: its block-diagonal adjacency is built per batch size in Python and held as
a sparse CSR tensor, which neither tracer records.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.store import RunStore, StoreError
from strategies.sparse.condense import condense
from strategies.sparse.flops import inference_flops
from strategies.sparse.masks import Mask, apply_mask, layer_densities, mask_density
from tasks.config import LeanfedConfig
from tasks.datasets import load_dataset
from tasks.evaluation import evaluate
from tasks.models import ModelError, build_model

__all__ = ["FORMATS", "ExportResult", "export_model", "load_checkpoint_model"]

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 17


@dataclass(frozen=True)
class ExportResult:
    """What ``export_model`` wrote."""

    model_path: Path
    mask_path: Path
    card_path: Path
    card: dict[str, Any]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint_model(
    store: RunStore, run_id: str, round: int | None = None
) -> tuple[torch.nn.Module, Mask, LeanfedConfig, int, str]:
    """(model with the checkpoint's weights and mask applied, mask, config, round, SHA-256)."""
    run = store.get_run(run_id)
    if round is None:
        found = store.latest_checkpoint(run_id)
        if found is None:
            raise StoreError(f"run {run_id} has no checkpoint to export")
        round, data = found
    else:
        data = store.get_checkpoint(run_id, round)
    sha = hashlib.sha256(data).hexdigest()
    ck = torch.load(io.BytesIO(data), weights_only=True)
    if not isinstance(ck, dict) or not isinstance(ck.get("state"), dict):
        raise StoreError(f"run {run_id} round {round}: checkpoint holds no model state")
    cfg = LeanfedConfig.from_run_config(dict(run.config))
    ds = load_dataset(cfg.dataset, seed=cfg.seed)
    model = build_model(cfg.model, tuple(ds.input_shape), ds.num_classes, seed=cfg.seed)
    try:
        model.load_state_dict(ck["state"])
    except RuntimeError as exc:
        raise StoreError(
            f"run {run_id} round {round}: checkpoint does not fit {cfg.model}"
        ) from exc
    raw = ck.get("mask")
    mask: Mask = dict(raw) if isinstance(raw, dict) else {}
    apply_mask(model, mask)
    return model.eval(), mask, cfg, round, sha


def export_model(
    store: RunStore,
    run_id: str,
    out_dir: Path,
    *,
    round: int | None = None,
    fmt: str = "torchscript",
) -> ExportResult:
    """Write the condensed global model of ``run_id`` (newest round unless ``round``) to out_dir."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model, mask, cfg, rnd, sha = load_checkpoint_model(store, run_id, round)
    if cfg.model == "gnn":
        raise ModelError("export supports the cnn, transformer and mlp models, not the gnn")
    ds = load_dataset(cfg.dataset, seed=cfg.seed)
    x_test = torch.as_tensor(ds.x_test, dtype=torch.float32)
    y_test = torch.as_tensor(ds.y_test, dtype=torch.int64)
    small = condense(model, mask).eval()
    example = x_test[:1]  # [1, *input_shape]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # tracer warnings about Python control flow: shape-static
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            model_path = out_dir / "model.pt"
            traced = torch.jit.trace(small, example, check_trace=False)
            torch.jit.save(traced, str(model_path))
        else:
            model_path = out_dir / "model.onnx"
            torch.onnx.export(
                small,
                (example,),
                str(model_path),
                dynamo=False,
                opset_version=ONNX_OPSET,
                input_names=["x"],
                output_names=["logits"],
                dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            )
    mask_path = out_dir / "mask.pt"
    torch.save({k: v.detach().cpu() for k, v in mask.items()}, mask_path)
    _, acc = evaluate(small, x_test, y_test)
    params = sum(p.numel() for p in model.parameters())
    card: dict[str, Any] = {
        "run_id": run_id,
        "round": rnd,
        "checkpoint_sha256": sha,
        "format": fmt,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "input_shape": list(ds.input_shape),
        "num_classes": ds.num_classes,
        "accuracy": acc,
        "test_examples": int(y_test.numel()),
        "density": mask_density(mask) if mask else 1.0,
        "layer_density": layer_densities(mask),
        "inference_flops_dense": inference_flops(model, example, None),
        "inference_flops_masked": inference_flops(model, example, mask or None),
        "params_dense": params,
        "params_condensed": sum(p.numel() for p in small.parameters()),
        "files": {p.name: _sha256(p) for p in (model_path, mask_path)},
    }
    card_path = out_dir / "model_card.json"
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    (out_dir / "model_card.md").write_text(_markdown(card))
    return ExportResult(model_path, mask_path, card_path, card)


def _markdown(card: dict[str, Any]) -> str:
    lines = [
        f"# Model card: run {card['run_id']}, round {card['round']}",
        "",
        f"- model: {card['model']} on {card['dataset']}, input {card['input_shape']}, "
        f"{card['num_classes']} classes; format {card['format']}",
        f"- accuracy of this export on the run's test set: {100 * card['accuracy']:.2f}% "
        f"({card['test_examples']} examples)",
        f"- density: {card['density']:.4f}; parameters {card['params_condensed']:,} condensed "
        f"of {card['params_dense']:,} dense",
        f"- forward FLOPs per example: {card['inference_flops_masked']:,} masked, "
        f"{card['inference_flops_dense']:,} dense",
        f"- from checkpoint SHA-256 {card['checkpoint_sha256']}",
        "",
        "| layer | density |",
        "|---|---|",
        *(f"| {k} | {v:.4f} |" for k, v in card["layer_density"].items()),
        "",
        "| file | SHA-256 |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in card["files"].items()),
        "",
    ]
    return "\n".join(lines)
