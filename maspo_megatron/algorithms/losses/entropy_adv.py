"""Entropy-Advantage (Cheng et al., "Reasoning with Exploration: An Entropy Perspective", arXiv 2506.14758).

The advantage gets a per-token entropy bonus, clipped so that it never dominates (or flips) A:

    psi_t    = min(alpha * sg[H_t], |A_t| / kappa)          H_t: policy entropy at token t (detached)
    A'_t     = A_t + psi_t
    loss_tok = GRPO's clipped surrogate on A' (+ the dual-clip cap for A' < 0, c = 3 as in verl)

With kappa > 1, psi < |A|, so a negative advantage stays negative, and A = 0 stays 0. Defaults:
alpha = 0.4, kappa = 2 (the paper's GRPO setting as we read it). The entropy is passed in
(`entropy[B, T]`: the trainer gives the same fused vocab-parallel entropy it reports).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from maspo_megatron.algorithms.hyper import option
from maspo_megatron.algorithms.losses.ppo import DUAL_CLIP_HELP, optional_dual_clip, ppo_clip
from maspo_megatron.algorithms.registry import register_policy_loss


def entropy_advantage(advantages: torch.Tensor, entropy: torch.Tensor, alpha: float, kappa: float) -> torch.Tensor:
    """A'[B, T] = A + min(alpha * sg[H], |A| / kappa) from advantages[B, T] and entropy[B, T]."""
    bonus = torch.minimum(alpha * entropy.detach(), advantages.abs() / kappa)
    return advantages + bonus


@dataclasses.dataclass
class EntropyAdvHyper:
    eps: float = option(0.2, gt=0, lt=1)
    dual_clip_c: Optional[float] = option(3.0, gt=1, help=DUAL_CLIP_HELP)
    alpha: float = option(0.4, ge=0, help="entropy bonus scale: A + min(alpha * H, |A| / kappa)")
    kappa: float = option(2.0, gt=1, help="the bonus never exceeds |A| / kappa")


@register_policy_loss("entropy_adv", EntropyAdvHyper)
def entropy_adv_loss(log_prob, old_log_prob, advantages, mask, *, eps: float, dual_clip_c: Optional[float],
                     alpha: float, kappa: float, entropy: Optional[torch.Tensor] = None):
    """Inputs [B, T] and entropy[B, T] (required); metrics per token: ratio, clipped, shaped_advantage."""
    if entropy is None or not isinstance(entropy, torch.Tensor) or entropy.shape != log_prob.shape:
        got = tuple(entropy.shape) if isinstance(entropy, torch.Tensor) else type(entropy).__name__
        raise ValueError(f"policy_loss 'entropy_adv': needs entropy of shape {tuple(log_prob.shape)}, got {got}")
    entropy = torch.where(mask, entropy.detach().to(log_prob.dtype), torch.zeros((), dtype=log_prob.dtype,
                                                                                 device=log_prob.device))
    shaped = entropy_advantage(advantages, entropy, alpha, kappa)
    ratio, loss, clipped = ppo_clip(log_prob, old_log_prob, shaped, 1 - eps, 1 + eps)
    loss, metrics = optional_dual_clip("entropy_adv", loss, clipped, shaped, ratio, dual_clip_c)
    metrics["shaped_advantage"] = shaped
    return loss, metrics
