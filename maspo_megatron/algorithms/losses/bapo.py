"""BAPO (Xi et al., "BAPO: Stabilizing Off-Policy Reinforcement Learning for LLMs via Balanced Policy
Optimization with Adaptive Clipping", arXiv 2510.18927): PPO clipping whose bounds widen per batch
until positive-advantage tokens carry at least a fraction rho_target of the loss.

Bound path (k = 0..K): low_k = min(low_start + k low_step, low_max), high_k = min(high_start +
k high_step, high_max), K the steps until both maxima are reached. For each candidate:

    P_k = sum_{A > 0} min(r, high_k) A            N_k = sum_{A < 0} max(r, low_k) |A|
    rho_k = P_k / (P_k + N_k)

The first k with rho_k >= rho_target is used (the last one if none; k = 0 for an empty batch),
then loss_tok = max(-r A, -clip(r, low_k, high_k) A), capped at -A c for A < 0 (dual clip, c = 3).
Raising low_k drops the gradient of more negative tokens with small ratios, raising high_k keeps
more positive tokens with large ratios: both move the balance toward the positive side.

"The batch" is whatever the sums cover: by default the tensors given; a distributed caller
computes `bapo_contribution_sums` on its shard, all-reduces them (one [K+1, 2] tensor) and passes
them as `batch_sums` (the registry's batch-sums input, trainer/loss_terms.py), so that every rank picks the same bounds. The choice is made on the device
(no host sync).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from maspo_megatron.algorithms.hyper import option
from maspo_megatron.algorithms.losses.ppo import DUAL_CLIP_HELP, optional_dual_clip, ppo_clip
from maspo_megatron.algorithms.ratio import clamped_log_ratio
from maspo_megatron.algorithms.registry import register_policy_loss


@dataclasses.dataclass
class BapoHyper:
    rho_target: float = option(0.5, ge=0, le=1, help="wanted share of the loss carried by A>0 tokens (the paper: 0.5)")
    low_start: float = option(0.6, gt=0, lt=1)
    low_max: float = option(0.9, gt=0, lt=1)
    low_step: float = option(0.05, ge=0, help="the public recipe's step")
    high_start: float = option(1.2, gt=1)
    high_max: float = option(3.0, gt=1)
    high_step: float = option(0.1, ge=0, help="the public recipe's step")
    dual_clip_c: Optional[float] = option(3.0, gt=1, help=DUAL_CLIP_HELP)

    def validate(self) -> None:
        if self.low_max < self.low_start:
            raise ValueError(f"low_max: {self.low_max} must be >= low_start ({self.low_start})")
        if self.high_max < self.high_start:
            raise ValueError(f"high_max: {self.high_max} must be >= high_start ({self.high_start})")


def bapo_bound_path(low_start: float, low_max: float, low_step: float, high_start: float, high_max: float,
                    high_step: float, *, dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(lows[K+1], highs[K+1]): the candidate ratio bounds, in search order."""
    if not (0 < low_start <= low_max < 1 < high_start <= high_max and low_step >= 0 and high_step >= 0):
        raise ValueError("policy_loss 'bapo': need 0 < low_start <= low_max < 1 < high_start <= high_max and "
                         f"steps >= 0, got low {low_start}..{low_max} step {low_step}, "
                         f"high {high_start}..{high_max} step {high_step}")
    # round() first: (0.9 - 0.6) / 0.02 is 15.000000000000002 in floating point, not 16 steps
    steps_low = 0 if low_step == 0 else math.ceil(round((low_max - low_start) / low_step, 9))
    steps_high = 0 if high_step == 0 else math.ceil(round((high_max - high_start) / high_step, 9))
    k = torch.arange(max(steps_low, steps_high) + 1, dtype=torch.float64, device=device)
    lows = (low_start + k * low_step).clamp(max=low_max)
    highs = (high_start + k * high_step).clamp(max=high_max)
    return lows.to(dtype), highs.to(dtype)


def _contributions(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, lows: torch.Tensor,
                   highs: torch.Tensor) -> torch.Tensor:
    """[K+1, 2]: (P_k, N_k) for every candidate, from ratio/advantages/mask [B, T] (detached)."""
    ratio, adv = ratio.detach().reshape(1, -1), advantages.detach().reshape(1, -1)
    pos = ((adv > 0) & mask.reshape(1, -1)).to(ratio.dtype)
    neg = ((adv < 0) & mask.reshape(1, -1)).to(ratio.dtype)
    p = (torch.minimum(ratio, highs[:, None]) * adv * pos).sum(-1)
    n = (torch.maximum(ratio, lows[:, None]) * adv.abs() * neg).sum(-1)
    return torch.stack([p, n], dim=-1)


def bapo_contribution_sums(log_prob, old_log_prob, advantages, mask, *, low_start: float, low_max: float,
                           low_step: float, high_start: float, high_max: float, high_step: float,
                           **_unused) -> torch.Tensor:
    """This shard's [K+1, 2] (P_k, N_k) sums in float64, to all-reduce (SUM) across the batch's ranks.

    Inputs [B, T]; masked positions may hold anything. Other BAPO keywords are accepted and ignored,
    so the loss's whole hyperparameter dict can be passed.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=log_prob.device)
    lp = torch.where(mask, log_prob.detach().double(), zero)
    old = torch.where(mask, old_log_prob.detach().double(), zero)
    adv = torch.where(mask, advantages.detach().double(), zero)
    lows, highs = bapo_bound_path(low_start, low_max, low_step, high_start, high_max, high_step,
                                  dtype=torch.float64, device=log_prob.device)
    return _contributions(torch.exp(clamped_log_ratio(lp, old)), adv, mask, lows, highs)


def bapo_choose(sums: torch.Tensor, rho_target: float) -> torch.Tensor:
    """Index (0-dim LongTensor) of the first candidate whose positive share reaches rho_target (else the last)."""
    total = sums.sum(-1)
    share = torch.where(total > 0, sums[:, 0] / total.clamp(min=torch.finfo(sums.dtype).tiny), torch.ones_like(total))
    ok = share >= rho_target
    last = torch.tensor(sums.shape[0] - 1, device=sums.device)
    return torch.where(ok.any(), ok.to(torch.int8).argmax(), last)


@register_policy_loss("bapo", BapoHyper, batch_sums=bapo_contribution_sums)
def bapo_loss(log_prob, old_log_prob, advantages, mask, *, rho_target: float, low_start: float, low_max: float,
              low_step: float, high_start: float, high_max: float, high_step: float, dual_clip_c: Optional[float],
              batch_sums: Optional[torch.Tensor] = None):
    """BAPO per-token loss. Inputs [B, T]; batch_sums[K+1, 2]: the all-reduced bapo_contribution_sums (default:
    this shard's). Metrics per token: ratio, clipped, clip_low, clip_high (chosen bounds)."""
    lows, highs = bapo_bound_path(low_start, low_max, low_step, high_start, high_max, high_step,
                                  dtype=log_prob.dtype, device=log_prob.device)
    if batch_sums is None:
        ratio = torch.exp(clamped_log_ratio(log_prob, old_log_prob))
        batch_sums = _contributions(ratio, advantages, mask, lows, highs)
    elif batch_sums.shape != (lows.numel(), 2):
        raise ValueError(f"policy_loss 'bapo': batch_sums must have shape {(lows.numel(), 2)}, "
                         f"got {tuple(batch_sums.shape)}")
    choice = bapo_choose(batch_sums.detach(), rho_target)
    low, high = lows[choice], highs[choice]
    ratio, loss, clipped = ppo_clip(log_prob, old_log_prob, advantages, low, high)
    loss, metrics = optional_dual_clip("bapo", loss, clipped, advantages, ratio, dual_clip_c)
    metrics["clip_low"] = low.expand_as(ratio)
    metrics["clip_high"] = high.expand_as(ratio)
    return loss, metrics
