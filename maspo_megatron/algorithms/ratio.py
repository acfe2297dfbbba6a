"""Shared pieces of the ratio-based losses: the clamped log-ratio and the PPO clipped surrogate."""
from __future__ import annotations

import torch

# Bound of the per-token log-ratio: exp(20) ~ 4.9e8 keeps r * A finite in fp32 for |A| up to ~1e29,
# and the gradient is 0 outside the window (clamp), as in the official MASPO code.
LOG_RATIO_LIMIT = 20.0


def clamped_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor) -> torch.Tensor:
    """log_ratio[B, T] = clamp(log_prob - old_log_prob, -20, 20), in the inputs' dtype."""
    return (log_prob - old_log_prob).clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    low: torch.Tensor | float,
    high: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO loss `max(-r A, -clip(r, low, high) A)` and where the clip cuts the gradient.

    Args:
        ratio[B, T], advantages[B, T]; low/high: floats or [B, T] tensors (lower/upper ratio bound).
    Returns:
        loss_tok[B, T]; clipped[B, T] bool (A > 0 and r > high, or A < 0 and r < low).
    """
    low_t = torch.as_tensor(low, dtype=ratio.dtype, device=ratio.device)
    high_t = torch.as_tensor(high, dtype=ratio.dtype, device=ratio.device)
    unclipped = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, low_t, high_t)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = ((advantages > 0) & (ratio > high_t)) | ((advantages < 0) & (ratio < low_t))
    return loss, clipped


def dual_clip_bound(loss: torch.Tensor, advantages: torch.Tensor, c: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual clip: for A < 0 the loss is capped at -A c (gradient 0 where the cap binds).

    Returns loss_tok[B, T] and the bool mask of tokens where the cap is active.
    """
    cap = -advantages * c
    capped = (advantages < 0) & (loss > cap)
    return torch.where(capped, cap, loss), capped
