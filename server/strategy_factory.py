"""The run's strategy from the validated config, fitted (with its first mask) to the model."""

from __future__ import annotations

import math
from typing import Any

import torch

from strategies.aggregation.condensed import CondensedSparseFedAvg
from strategies.aggregation.counting import ByteCountingFedAvg
from strategies.aggregation.dp import DPSparseFedAvg
from strategies.aggregation.secagg import SecAggSparseFedAvg
from strategies.aggregation.secagg_dp import SecAggDPSparseFedAvg
from strategies.aggregation.secagg_record import SecAggRecordDPSparseFedAvg
from strategies.aggregation.strategy import SparseFedAvg
from strategies.aggregation.validate import ReplyLimits
from strategies.privacy.accountant import SiteAccounting
from strategies.sparse.layout import plan_densities, planned_random_mask
from strategies.sparse.masks import Mask
from strategies.sparse.saliency import saliency_mask, saliency_scores
from strategies.sparse.structured import structured_init
from strategies.sparse.units import unit_groups
from tasks.config import STRUCTURED_RULES, LeanfedConfig
from tasks.plugins import merge_options, rule_options
from tasks.structure import layer_kinds, run_selection, unit_rows

__all__ = ["build_strategy", "fit_strategy", "reply_limits", "sparse_init"]


def sparse_init(model: torch.nn.Module, cfg: LeanfedConfig) -> Mask:
    """Seeded initial mask (ERK/uniform), applied with sparsity-aware rescaling, in place.

    Masking a dense init shrinks each layer's output variance by its density d; scaling
    the kept weights by 1/sqrt(d) restores it (Evci et al. 2022, "Gradient Flow in Sparse
    Neural Networks"), so a very sparse start does not sit at chance for rounds.
    """
    sel = run_selection(model, cfg)
    kinds = layer_kinds(model, cfg)
    slices = {} if kinds else sel.slices  # structured units span fused q/k/v slices
    densities = plan_densities(
        sel.shapes,
        cfg.dst_density,
        distribution=cfg.dst_distribution,
        slices=slices,
        erk_power_scale=cfg.dst_erk_power_scale,
        overrides=cfg.dst_overrides(),
    )
    if kinds:  # whole units / constant fan-in / N:M, as the clients' structured engine keeps
        gen = torch.Generator().manual_seed(cfg.seed)
        mask = structured_init(sel.shapes, densities, kinds, gen, unit_rows=unit_rows(model, cfg))
    elif cfg.dst_init == "magnitude":
        mask = saliency_mask(saliency_scores("magnitude", model, sel.params), densities, sel.slices)
    else:
        gen = torch.Generator().manual_seed(cfg.seed)
        mask = planned_random_mask(sel.shapes, densities, sel.slices, gen)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in mask.items():
            d = float(m.sum()) / m.numel()
            params[name].mul_(m).mul_(1.0 / math.sqrt(d))
    return mask


def build_strategy(cfg: LeanfedConfig) -> SparseFedAvg | ByteCountingFedAvg:
    """Flower's FedAvg (bytes counted, maths as is) for the dense baseline, else SparseFedAvg."""
    sampling = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": 0 if cfg.fraction_evaluate == 0 else 1,
        "min_available_nodes": cfg.min_train_nodes,
    }
    limits = reply_limits(cfg)
    if cfg.strategy == "flower-fedavg":
        return ByteCountingFedAvg(limits=limits, **sampling)
    dynamic = cfg.dst_rule in ("set", "rigl", *STRUCTURED_RULES)
    end_round: int | None = max(1, int(cfg.dst_end_round_fraction * cfg.num_server_rounds))
    if cfg.cl_scenario != "none":
        end_round = None  # a stream can switch task in any round: keep re-voting to the end
    secure: dict[str, Any] = {}
    cls: type[SparseFedAvg] = SparseFedAvg
    if cfg.dst_condensed:  # unit groups are set from the model in run_federated
        cls = CondensedSparseFedAvg
    elif cfg.secure_mode == "secagg":
        cls = SecAggSparseFedAvg
        secure = {
            "threshold": cfg.secure_threshold,
            "clip": cfg.secure_clip,
            "quant_bits": cfg.secure_quant_bits,
            "max_weight": cfg.secure_max_weight,
            "neighbors": cfg.secure_neighbors,
        }
        if cfg.privacy_mode == "client":  # distributed noise: strategies/aggregation/secagg_dp.py
            cls = SecAggDPSparseFedAvg
            secure |= {
                "noise_multiplier": cfg.privacy_noise_multiplier,
                "dp_clip": cfg.privacy_clip,
                "delta": cfg.privacy_delta,
                "num_clients": cfg.num_partitions,
                "adaptive_clip": cfg.privacy_adaptive_clip,
                "target_quantile": cfg.privacy_target_quantile,
                "clip_lr": cfg.privacy_clip_lr,
            }
        elif cfg.privacy_mode == "record":  # DP-SGD sites, epsilon beside the masked vector
            cls = SecAggRecordDPSparseFedAvg
            secure["accounting"] = SiteAccounting.of(cfg)  # the sites' epsilon, recomputed
    elif cfg.privacy_mode != "none":
        cls = DPSparseFedAvg
        secure = {  # the DP wrapper's own knobs (strategies/aggregation/dp.py)
            "privacy_mode": cfg.privacy_mode,
            "noise_multiplier": cfg.privacy_noise_multiplier,
            "clip": cfg.privacy_clip,
            "delta": cfg.privacy_delta,
            "num_clients": cfg.num_partitions,
            "adaptive_clip": cfg.privacy_adaptive_clip,
            "target_quantile": cfg.privacy_target_quantile,
            "clip_lr": cfg.privacy_clip_lr,
        }
        if cfg.privacy_mode == "record":  # the sites' epsilon, recomputed from public data
            secure["accounting"] = SiteAccounting.of(cfg)
    return cls(
        **secure,
        density=1.0 if cfg.dst_rule == "dense" else cfg.dst_density,
        distribution=cfg.dst_distribution,
        upload_dtype=cfg.codec_upload_dtype,
        download_dtype=cfg.codec_download_dtype,
        merge_rule=cfg.aggregation_rule,
        trim=cfg.aggregation_trim,
        merge_options=merge_options(cfg),
        rule_options=rule_options(cfg),
        vote=cfg.aggregation_vote,
        # FedDST: the server re-votes the mask on the rounds clients readjust theirs.
        mask_update_interval=cfg.dst_mask_round_interval if dynamic else 1,
        mask_update_end_round=end_round if dynamic else 0,
        max_density_tolerance=cfg.aggregation_max_density_tolerance,
        seed=cfg.seed,
        limits=limits,
        **sampling,  # type: ignore[arg-type]
    )


def reply_limits(cfg: LeanfedConfig) -> ReplyLimits:
    """The run config's bounds on client replies (see strategies.aggregation.validate)."""
    return ReplyLimits(
        max_num_examples=cfg.aggregation_max_num_examples,
        max_abs=cfg.aggregation_max_abs_value,
        norm_factor=cfg.aggregation_norm_bound_factor,
        max_norm=cfg.aggregation_max_update_norm,
    )


def fit_strategy(
    strategy: SparseFedAvg | ByteCountingFedAvg, model: torch.nn.Module, cfg: LeanfedConfig
) -> None:
    """Hand the strategy what it needs from the model (also on resume): the layer structure,
    multi-row units, condensed unit groups, and the clients' DST selection for its fallback
    initial mask (one definition of which tensors are sparsifiable: tasks.structure)."""
    if isinstance(strategy, SparseFedAvg):
        strategy.structure = layer_kinds(model, cfg)
        strategy.unit_rows = unit_rows(model, cfg)
        if strategy.sparse_keys is None:
            strategy.sparse_keys = list(run_selection(model, cfg).params)
    if isinstance(strategy, CondensedSparseFedAvg):
        strategy.unit_groups = unit_groups(model)
