"""CISPO (MiniMax-M1, arXiv 2506.13585): clip the importance-sampling WEIGHT, never drop a token's gradient.

    r = exp(clamp(logp - old_logp, -20, 20))
    loss_tok = -sg[clip(r, 1 - eps_low, 1 + eps_high)] * A * logp
    d loss_tok / d logp = -clip(r, 1 - eps_low, 1 + eps_high) * A

Unlike the PPO clip, every token keeps a gradient (scaled by the clipped weight). The loss VALUE
is A-weighted log-likelihood, not a ratio surrogate (verl's and slime's CISPO report the same value).
MiniMax-M1 sets no lower bound in practice: eps_low = 1 makes the lower bound 0, which never binds.
"""
from __future__ import annotations

import dataclasses

import torch

from maspo_megatron.algorithms.hyper import option
from maspo_megatron.algorithms.ratio import clamped_log_ratio
from maspo_megatron.algorithms.registry import register_policy_loss


@dataclasses.dataclass
class CispoHyper:
    eps_low: float = option(1.0, gt=0, le=1, help="lower bound 1-eps_low of the IS weight (1: no lower bound)")
    eps_high: float = option(0.28, gt=0, help="upper bound 1+eps_high of the IS weight")


@register_policy_loss("cispo", CispoHyper)
def cispo_loss(log_prob, old_log_prob, advantages, mask, *, eps_low: float, eps_high: float):
    """CISPO per-token loss. Inputs [B, T]; metrics per token: ratio, clipped (the weight was clipped)."""
    ratio = torch.exp(clamped_log_ratio(log_prob, old_log_prob)).detach()
    weight = ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = -weight * advantages * log_prob
    return loss, {"ratio": ratio, "clipped": (weight != ratio).to(ratio.dtype)}
