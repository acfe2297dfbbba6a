"""Clipped-surrogate baselines: GRPO, clip-higher (DAPO), dual-clip PPO, DAC (DCPO).

All share `loss_tok = max(-r A, -clip(r, low, high) A)`; they differ in the bounds:
    grpo:        [1 - eps, 1 + eps], and for A < 0 the loss is capped at -A dual_clip_c
    clip_higher: [1 - eps_low, 1 + eps_high], capped likewise
    dual_clip:   [1 - eps, 1 + eps], and for A < 0 the loss is capped at -A c
grpo and clip_higher apply the dual-clip cap by default with c = 3, as verl's vanilla PPO/GRPO
loss always does (`clip_ratio_c = 3.0`); `dual_clip_c=None` turns it off.
    dac:         q = p_old = exp(old_logp);
                 [0.5 + 0.5 sqrt(max(1 - 4 eps_low / q, 0)), 0.5 + 0.5 sqrt(1 + 4 eps_high / q)]
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from maspo_megatron.algorithms.hyper import option
from maspo_megatron.algorithms.ratio import clamped_log_ratio, clipped_surrogate, dual_clip_bound
from maspo_megatron.algorithms.registry import register_policy_loss

DUAL_CLIP_HELP = "cap -A c on the loss of A<0 tokens (verl's GRPO always applies c=3); null turns it off"


@dataclasses.dataclass
class GrpoHyper:
    eps: float = option(0.2, gt=0, lt=1)
    dual_clip_c: Optional[float] = option(3.0, gt=1, help=DUAL_CLIP_HELP)


@dataclasses.dataclass
class ClipHigherHyper:
    eps_low: float = option(0.2, gt=0, lt=1)
    eps_high: float = option(0.28, gt=0)
    dual_clip_c: Optional[float] = option(3.0, gt=1, help=DUAL_CLIP_HELP)


@dataclasses.dataclass
class DualClipHyper:
    eps: float = option(0.2, gt=0, lt=1)
    c: float = option(3.0, gt=1)


@dataclasses.dataclass
class DacHyper:
    eps_low: float = option(0.16, gt=0, lt=1)
    eps_high: float = option(0.2, gt=0)


def ppo_clip(log_prob, old_log_prob, advantages, low, high):
    """(ratio, loss_tok, clipped), each [B, T]: the clipped surrogate on the clamped ratio."""
    ratio = torch.exp(clamped_log_ratio(log_prob, old_log_prob))
    loss, clipped = clipped_surrogate(ratio, advantages, low, high)
    return ratio, loss, clipped


def optional_dual_clip(name: str, loss, clipped, advantages, ratio, c: Optional[float]):
    """The dual-clip cap when c is given: (loss[B, T], metrics {ratio, clipped, dual_clipped})."""
    if c is None:
        return loss, {"ratio": ratio, "clipped": clipped.to(ratio.dtype)}
    loss, capped = dual_clip_bound(loss, advantages, c)
    return loss, {"ratio": ratio, "clipped": (clipped | capped).to(ratio.dtype), "dual_clipped": capped.to(ratio.dtype)}


@register_policy_loss("grpo", GrpoHyper)
def grpo_loss(log_prob, old_log_prob, advantages, mask, *, eps: float, dual_clip_c: Optional[float]):
    """GRPO/PPO clip (+ dual clip). Inputs [B, T]; metrics per token: ratio, clipped[, dual_clipped]."""
    ratio, loss, clipped = ppo_clip(log_prob, old_log_prob, advantages, 1 - eps, 1 + eps)
    return optional_dual_clip("grpo", loss, clipped, advantages, ratio, dual_clip_c)


@register_policy_loss("clip_higher", ClipHigherHyper)
def clip_higher_loss(log_prob, old_log_prob, advantages, mask, *, eps_low: float, eps_high: float,
                     dual_clip_c: Optional[float]):
    """DAPO's decoupled clip (+ dual clip). Inputs [B, T]; metrics per token: ratio, clipped[, dual_clipped]."""
    ratio, loss, clipped = ppo_clip(log_prob, old_log_prob, advantages, 1 - eps_low, 1 + eps_high)
    return optional_dual_clip("clip_higher", loss, clipped, advantages, ratio, dual_clip_c)


@register_policy_loss("dual_clip", DualClipHyper)
def dual_clip_loss(log_prob, old_log_prob, advantages, mask, *, eps: float, c: float):
    """Dual-clip PPO. Inputs [B, T]; metrics per token: ratio, clipped (either clip), dual_clipped."""
    ratio, loss, clipped = ppo_clip(log_prob, old_log_prob, advantages, 1 - eps, 1 + eps)
    loss, capped = dual_clip_bound(loss, advantages, c)
    return loss, {
        "ratio": ratio,
        "clipped": (clipped | capped).to(ratio.dtype),
        "dual_clipped": capped.to(ratio.dtype),
    }


def dac_bounds(old_log_prob: torch.Tensor, eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DCPO's probability-dependent ratio bounds (low[B, T], high[B, T]) from old_log_prob[B, T].

    4 eps / q is computed as 4 eps * exp(-old_logp): for p_old -> 0 the upper bound grows to
    inf and the lower one to 0.5, without NaN.
    """
    inv_q = torch.exp(-old_log_prob)
    low = 0.5 + 0.5 * torch.sqrt((1 - 4 * eps_low * inv_q).clamp(min=0))
    high = 0.5 + 0.5 * torch.sqrt(1 + 4 * eps_high * inv_q)
    return low, high


@register_policy_loss("dac", DacHyper)
def dac_loss(log_prob, old_log_prob, advantages, mask, *, eps_low: float, eps_high: float):
    """Dynamic adaptive clipping (DCPO). Inputs [B, T]; metrics per token: ratio, clipped.

    The bounds themselves are not metrics: the upper one grows like p_old^-1/2 (inf for p_old = 0),
    so its mean over tokens would say nothing; `dac_bounds` gives them when needed.
    """
    low, high = dac_bounds(old_log_prob, eps_low, eps_high)
    ratio, loss, clipped = ppo_clip(log_prob, old_log_prob, advantages, low, high)
    return loss, {"ratio": ratio, "clipped": clipped.to(ratio.dtype)}
