"""MASPO's mass-adaptive statistics as SUMS and COUNTS (../shared/MASPO.md, "report every step").

Registered as the statistics "maspo" (with the hyperparameters of algorithm.maspo), which every
built-in loss reports by default (`register_policy_loss(..., statistics=...)`): for a baseline
they show what MASPO's gate would have done, the comparison point of docs/experiments.md.

`maspo_statistics` returns only additive quantities, so a caller can all-reduce(SUM) every entry
across micro-batches and ranks and then call `finalize_statistics` once. The gate quantities
describe the soft gate of the given hyperparameters even when gate=False (then they show what the
gate would have done); the PPO clip fraction at eps 0.2 is the comparison point with GRPO.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from maspo_megatron.algorithms.losses.maspo import maspo_gate, maspo_sigma
from maspo_megatron.algorithms.ratio import clamped_log_ratio
from maspo_megatron.algorithms.registry import compute_dtype, loss_hyperparameters, register_statistics

# Buckets of old-policy probability p_old: name -> [low, high).
P_OLD_BUCKETS = {
    "p_lt_0.01": (0.0, 0.01),
    "p_0.01_0.1": (0.01, 0.1),
    "p_0.1_0.5": (0.1, 0.5),
    "p_gt_0.5": (0.5, math.inf),
}
PPO_DIAGNOSTIC_EPS = 0.2
_SIGMA_KEYS = ("sigma_base", "alpha", "sigma_high", "adv_low", "adv_high", "beta_pos", "beta_neg")


def maspo_statistics(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: Optional[torch.Tensor] = None,
    **maspo_hyper,
) -> dict[str, torch.Tensor]:
    """Sums and counts over the unmasked tokens of [B, T] inputs; every value an fp32 scalar.

    maspo_hyper: the keys of the maspo loss (cfg.algorithm.maspo); gate_grad, gate, clip_eps and
    dual_clip_c are accepted and do not change the statistics. entropy[B, T]: optional per-token
    policy entropy.
    """
    accepted = loss_hyperparameters("maspo")
    for key in maspo_hyper:
        if key not in accepted:
            raise ValueError(f"maspo_statistics: unknown hyperparameter {key!r} (accepted: {sorted(accepted)})")
    hyper = {**accepted, **maspo_hyper}
    for arg_name, tensor in (("old_log_prob", old_log_prob), ("advantages", advantages), ("mask", mask)):
        if tensor.shape != log_prob.shape:
            raise ValueError(
                f"maspo_statistics: {arg_name} has shape {tuple(tensor.shape)}, log_prob has {tuple(log_prob.shape)}"
            )
    dtype = compute_dtype(log_prob.dtype)
    mask = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=log_prob.device)
    with torch.no_grad():
        lp = torch.where(mask, log_prob.detach().to(dtype), zero)
        old_lp = torch.where(mask, old_log_prob.detach().to(dtype), zero)
        adv = torch.where(mask, advantages.detach().to(dtype), zero)
        log_ratio = clamped_log_ratio(lp, old_lp)
        ratio = torch.exp(log_ratio)
        sigma_args = {key: hyper[key] for key in _SIGMA_KEYS}
        mass, sigma_pos, sigma_neg = maspo_sigma(old_lp, adv, **sigma_args)
        w, sigma, pos, neg = maspo_gate(ratio, adv, mass, sigma_pos, sigma_neg)
        gated = (pos | neg) & mask
        unclamped_mass = hyper["sigma_base"] * torch.exp(-hyper["alpha"] * old_lp)
        eps = PPO_DIAGNOSTIC_EPS
        ppo_clipped = ((adv > 0) & (ratio > 1 + eps)) | ((adv < 0) & (ratio < 1 - eps))

        def total(values: torch.Tensor, where: torch.Tensor = mask) -> torch.Tensor:
            return torch.where(where, values.to(dtype), zero).sum().to(torch.float32)

        ones = torch.ones_like(ratio)
        sums = {
            "token_count": total(ones),
            "gated_pos_count": total(ones, pos & mask),
            "gated_neg_count": total(ones, neg & mask),
            "gate_weight_gated_sum": total(w, gated),
            "gate_weight_sum": total(w),
            "sigma_sum": total(sigma),
            "sigma_high_count": total(ones, (unclamped_mass >= hyper["sigma_high"]) & mask),
            "abs_log_ratio_sum": total(log_ratio.abs()),
            "ratio_sum": total(ratio),
            "ppo_clip_count": total(ones, ppo_clipped & mask),
        }
        p_old = torch.exp(old_lp)
        for name, (low, high) in P_OLD_BUCKETS.items():
            in_bucket = mask & (p_old >= low) & (p_old < high)
            sums[f"{name}/token_count"] = total(ones, in_bucket)
            sums[f"{name}/ratio_sum"] = total(ratio, in_bucket)
            sums[f"{name}/gate_weight_sum"] = total(w, in_bucket)
            sums[f"{name}/gated_count"] = total(ones, in_bucket & gated)
        if entropy is not None:
            if entropy.shape != log_prob.shape:
                raise ValueError(
                    f"maspo_statistics: entropy has shape {tuple(entropy.shape)}, log_prob has {tuple(log_prob.shape)}"
                )
            sums["entropy_sum"] = total(entropy.detach())
    return sums


def _ratio(numerator: torch.Tensor | float, denominator: torch.Tensor | float) -> float:
    denominator = float(denominator)
    return float(numerator) / denominator if denominator > 0 else math.nan


def finalize_statistics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Means and fractions named "maspo/...", from (possibly all-reduced) maspo_statistics sums.

    A mean over an empty set (no gated tokens, an empty bucket) is NaN.
    """
    missing = [key for key in ("token_count", "gated_pos_count", "ratio_sum") if key not in sums]
    if missing:
        raise ValueError(f"finalize_statistics: missing sums {missing}; pass the dict from maspo_statistics")
    tokens = sums["token_count"]
    gated = float(sums["gated_pos_count"]) + float(sums["gated_neg_count"])
    stats = {
        "maspo/gated_pos_frac": _ratio(sums["gated_pos_count"], tokens),
        "maspo/gated_neg_frac": _ratio(sums["gated_neg_count"], tokens),
        "maspo/gate_weight_mean_gated": _ratio(sums["gate_weight_gated_sum"], gated),
        "maspo/gate_weight_mean": _ratio(sums["gate_weight_sum"], tokens),
        "maspo/sigma_mean": _ratio(sums["sigma_sum"], tokens),
        "maspo/sigma_high_frac": _ratio(sums["sigma_high_count"], tokens),
        "maspo/abs_log_ratio_mean": _ratio(sums["abs_log_ratio_sum"], tokens),
        "maspo/ratio_mean": _ratio(sums["ratio_sum"], tokens),
        "maspo/ppo_clip_frac": _ratio(sums["ppo_clip_count"], tokens),
        "maspo/token_count": float(tokens),
    }
    for name in P_OLD_BUCKETS:
        bucket_tokens = sums[f"{name}/token_count"]
        stats[f"maspo/{name}/token_frac"] = _ratio(bucket_tokens, tokens)
        stats[f"maspo/{name}/ratio_mean"] = _ratio(sums[f"{name}/ratio_sum"], bucket_tokens)
        stats[f"maspo/{name}/gate_weight_mean"] = _ratio(sums[f"{name}/gate_weight_sum"], bucket_tokens)
        stats[f"maspo/{name}/gated_frac"] = _ratio(sums[f"{name}/gated_count"], bucket_tokens)
    if "entropy_sum" in sums:
        stats["maspo/entropy_mean"] = _ratio(sums["entropy_sum"], tokens)
    return stats


register_statistics("maspo", maspo_statistics, finalize_statistics, section="maspo")
