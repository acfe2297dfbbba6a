"""GSPO: the clipped surrogate on the sequence-level ratio s = exp(mean_t log r_t).

Token form (GSPO-token with sequence-constant advantages): each token carries
    log s_t = log r_t - sg[log r_t] + sg[mean_seq log r]
so its VALUE is the sequence ratio s and its gradient is s * d log r_t. Summed over a sequence's
tokens with equal weights (every aggregation mode does this) the gradient equals sequence-level
GSPO's. Because the sequence mean is only used as a value, a distributed caller (sequence split
over context-parallel ranks, or packed rows) may pass `seq_log_ratio` with or without autograd
history: it is detached here, and the result does not depend on how the sequence was cut.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from maspo_megatron.algorithms.hyper import option
from maspo_megatron.algorithms.ratio import LOG_RATIO_LIMIT, clamped_log_ratio, clipped_surrogate
from maspo_megatron.algorithms.registry import register_policy_loss


def row_mean_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of log_ratio[B, T] over each row, broadcast back to [B, T] (detached)."""
    log_ratio = log_ratio.detach()
    counts = mask.sum(-1, keepdim=True).clamp(min=1).to(log_ratio.dtype)
    means = (log_ratio * mask).sum(-1, keepdim=True) / counts
    return means.expand_as(log_ratio)


@dataclasses.dataclass
class GspoHyper:
    eps_low: float = option(3e-4, gt=0, lt=1)
    eps_high: float = option(4e-4, gt=0)


@register_policy_loss("gspo", GspoHyper)
def gspo_loss(
    log_prob,
    old_log_prob,
    advantages,
    mask,
    *,
    eps_low: float,
    eps_high: float,
    seq_log_ratio: Optional[torch.Tensor] = None,
):
    """GSPO per-token loss. Inputs [B, T]; one sample per row unless seq_log_ratio[B, T] is given.

    Metrics per token: ratio (the sequence ratio s), token_ratio (r_t), clipped.
    """
    log_ratio = clamped_log_ratio(log_prob, old_log_prob)
    if seq_log_ratio is None:
        seq = row_mean_log_ratio(log_ratio, mask)
    else:
        if not isinstance(seq_log_ratio, torch.Tensor) or seq_log_ratio.shape != log_ratio.shape:
            got = tuple(seq_log_ratio.shape) if isinstance(seq_log_ratio, torch.Tensor) else type(seq_log_ratio).__name__
            raise ValueError(f"policy_loss 'gspo': seq_log_ratio must be a tensor of shape {tuple(log_ratio.shape)}, got {got}")
        seq = torch.where(mask, seq_log_ratio.detach().to(log_ratio.dtype), torch.zeros_like(log_ratio))
        seq = seq.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    seq_ratio = torch.exp(log_ratio - log_ratio.detach() + seq)
    loss, clipped = clipped_surrogate(seq_ratio, advantages, 1 - eps_low, 1 + eps_high)
    metrics = {
        "ratio": seq_ratio,
        "token_ratio": torch.exp(log_ratio),
        "clipped": clipped.to(log_ratio.dtype),
    }
    return loss, metrics
