"""Corrections for the mismatch between the rollout engine and the trainer (pure functions).

The engine samples with pi_rollout (SGLang kernels, bf16/fp8); the trainer recomputes pi_old with
its own forward pass. With rho_t = pi_old / pi_rollout of each sampled token, in log space

    log_ratio_t = clamp(old_logp_t - rollout_logp_t, -20, 20)

this module gives, following verl's rollout correction (`rollout_corr_helper.py`, as facts):

- importance_weights: w_t = min(rho_t, threshold) (token) or min(prod_{t in s} rho_t, threshold)
  (sequence: exp of the clamped per-sample SUM of log-ratios, broadcast to its tokens). They are
  constants (detached) that MULTIPLY THE PER-TOKEN LOSS, so the policy loss's own terms (MASPO's
  sigma, the clip) still see the advantage unchanged.
- rejection_keep: a hard trust region. Tokens (token level), or whole samples (sequence: the
  product of ratios; geometric: exp of the MEAN log-ratio) whose statistic lies outside
  [lower, upper] are dropped from the loss. Combined with IS weights at the same level this is
  verl's masked IS (MIS).
- mismatch_sums: SUMS over tokens (add up across micro-batches and ranks; divide by the token
  count for means): the KL(pi_rollout || pi_old) estimators k1 = -log_ratio and
  k3 = rho - 1 - log_ratio, |log_ratio|, and rho^2 (its mean minus 1 is the token chi^2).

Per-sample statistics: without `seq_log_ratio_sum`, each row is one sample; a distributed caller
(packed rows, samples split across context-parallel ranks) passes each token's WHOLE-sample sum
of log-ratios (and token count), all-reduced, as [B, T].
"""
from __future__ import annotations

import math
from typing import Optional

import torch

IS_LEVELS = ("token", "sequence")
REJECTION_LEVELS = ("token", "sequence", "geometric")
_LOG_LIMIT = 20.0


def rollout_log_ratio(old_log_prob: torch.Tensor, rollout_log_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(pi_old / pi_rollout)[B, T], clamped to [-20, 20], 0 at masked positions, detached, >= fp32."""
    dtype = torch.promote_types(old_log_prob.dtype, torch.float32)
    diff = old_log_prob.detach().to(dtype) - rollout_log_prob.detach().to(dtype)
    return torch.where(mask.bool(), diff.clamp(-_LOG_LIMIT, _LOG_LIMIT), torch.zeros((), dtype=dtype,
                                                                                     device=diff.device))


def _row_sums(log_ratio: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sums = (log_ratio * mask).sum(-1, keepdim=True).expand_as(log_ratio)
    counts = mask.sum(-1, keepdim=True).to(log_ratio.dtype).expand_as(log_ratio)
    return sums, counts


def _sequence_stats(log_ratio, mask, seq_log_ratio_sum, seq_token_count):
    if seq_log_ratio_sum is None:
        return _row_sums(log_ratio, mask)
    if seq_log_ratio_sum.shape != log_ratio.shape:
        raise ValueError(f"rollout correction: seq_log_ratio_sum has shape {tuple(seq_log_ratio_sum.shape)}, "
                         f"expected {tuple(log_ratio.shape)}")
    counts = seq_token_count if seq_token_count is not None else torch.ones_like(log_ratio)
    return seq_log_ratio_sum.detach().to(log_ratio.dtype), counts.to(log_ratio.dtype)


def importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str, threshold: float, *,
                       seq_log_ratio_sum: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Truncated IS weights w[B, T] (detached, 0 at masked positions) from rollout_log_ratio's output.

    level: "token" (min(rho_t, threshold)) or "sequence" (min(prod rho over the sample, threshold)).
    """
    if level not in IS_LEVELS:
        raise ValueError(f"importance_weights: level {level!r} is not one of {list(IS_LEVELS)}")
    if not threshold > 0:
        raise ValueError(f"importance_weights: threshold must be > 0, got {threshold!r}")
    mask = mask.bool()
    if level == "token":
        log_w = log_ratio
    else:
        log_w = _sequence_stats(log_ratio, mask, seq_log_ratio_sum, None)[0].clamp(-_LOG_LIMIT, _LOG_LIMIT)
    weights = torch.exp(log_w.detach()).clamp(max=threshold)
    return torch.where(mask, weights, torch.zeros_like(weights))


def rejection_keep(log_ratio: torch.Tensor, mask: torch.Tensor, level: str, lower: float, upper: float, *,
                   seq_log_ratio_sum: Optional[torch.Tensor] = None,
                   seq_token_count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool [B, T]: True where the token stays in the loss (False at masked positions too).

    The statistic (a ratio) must lie in [lower, upper]: rho_t (token), prod_s rho (sequence) or
    exp(mean_s log rho) (geometric). Compared in log space, so products far beyond fp32 are fine.
    """
    if level not in REJECTION_LEVELS:
        raise ValueError(f"rejection_keep: level {level!r} is not one of {list(REJECTION_LEVELS)}")
    if not 0 < lower <= upper:
        raise ValueError(f"rejection_keep: need 0 < lower <= upper, got lower={lower!r}, upper={upper!r}")
    mask = mask.bool()
    if level == "token":
        stat = log_ratio
    else:
        sums, counts = _sequence_stats(log_ratio, mask, seq_log_ratio_sum, seq_token_count)
        stat = sums if level == "sequence" else sums / counts.clamp(min=1)
    return mask & (stat >= math.log(lower)) & (stat <= math.log(upper))


def mismatch_sums(log_ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp64 scalar SUMS over the masked tokens: kl_k1, kl_k3, abs_log_ratio, ratio_sq (see the module doc)."""
    mask = mask.bool()
    x = log_ratio.detach().double()[mask]
    return {
        "kl_k1": (-x).sum(),
        "kl_k3": (torch.expm1(x) - x).sum(),
        "abs_log_ratio": x.abs().sum(),
        "ratio_sq": torch.exp(2 * x).sum(),
    }
