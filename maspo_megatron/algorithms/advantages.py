"""Outcome-reward advantages over groups of samples of the same prompt, and reward shaping.

Samples of one group are contiguous: rewards[N] = [g0s0, g0s1, ..., g1s0, ...], N = groups * G.
    grpo:   (R - mean_g) / (std_g + eps)     unbiased std (G - 1 in the denominator)
    drgrpo: R - mean_g                       (Dr.GRPO: no std normalisation)
    rloo:   R - mean of the OTHER G - 1 rewards of the group = G / (G - 1) * (R - mean_g)
"""
from __future__ import annotations

import torch

ADVANTAGE_ESTIMATORS = ("grpo", "drgrpo", "rloo")


def _grouped(rewards: torch.Tensor, group_size: int, caller: str) -> torch.Tensor:
    """rewards[N] -> float64 [N / G, G], checking the layout."""
    if rewards.dim() != 1:
        raise ValueError(f"{caller}: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{caller}: group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{caller}: {rewards.numel()} rewards are not a multiple of group_size={group_size}")
    return rewards.detach().to(torch.float64).reshape(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str = "grpo", eps: float = 1e-6) -> torch.Tensor:
    """Per-sample advantages[N] (fp32) from rewards[N]; computed in float64, groups contiguous."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"group_advantages: unknown estimator {estimator!r} (expected one of {list(ADVANTAGE_ESTIMATORS)})")
    grouped = _grouped(rewards, group_size, "group_advantages")
    if group_size < 2:
        raise ValueError(f"group_advantages: group_size must be >= 2 for a group baseline, got {group_size}")
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        adv = centred / (grouped.std(dim=1, unbiased=True, keepdim=True) + eps)
    elif estimator == "drgrpo":
        adv = centred
    else:
        adv = centred * (group_size / (group_size - 1))
    return adv.reshape(-1).to(torch.float32)


def overlong_penalty(
    response_lengths: torch.Tensor, max_new_tokens: int, buffer_tokens: int, penalty: float
) -> torch.Tensor:
    """DAPO's soft overlong punishment, a reward term <= 0 per sample: fp32 [N] from lengths[N].

    0 up to max_new_tokens - buffer_tokens, then falling linearly to -penalty at max_new_tokens,
    and -penalty beyond it.
    """
    if not 1 <= buffer_tokens <= max_new_tokens:
        raise ValueError(f"overlong_penalty: buffer_tokens={buffer_tokens} must be in [1, max_new_tokens={max_new_tokens}]")
    if penalty < 0:
        raise ValueError(f"overlong_penalty: penalty must be >= 0, got {penalty}")
    lengths = response_lengths.detach().to(torch.float64)
    start = max_new_tokens - buffer_tokens
    over = ((lengths - start) / buffer_tokens).clamp(0, 1)
    return (-penalty * over).to(torch.float32)


def keep_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dynamic-sampling predicate: BoolTensor[N / G], False where all rewards of the group are equal
    (such a group has zero advantage everywhere and only dilutes the batch)."""
    grouped = _grouped(rewards, group_size, "keep_groups")
    return grouped.amax(dim=1) > grouped.amin(dim=1)
