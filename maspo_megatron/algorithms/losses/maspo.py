"""MASPO: soft Gaussian gate with a mass-adaptive, advantage-asymmetric width (../shared/MASPO.md).

    log_ratio = clamp(logp - old_logp, -20, 20);  r = exp(log_ratio)
    pos = (A > 0) & (r > 1);  neg = (A < 0) & (r < 1)              (strict, on the clamped r)
    mass = clamp(sigma_base * exp(-alpha * old_logp), sigma_base, sigma_high)
    sigma_pos = mass * clamp(1 + beta_pos * A, adv_low, adv_high)
    sigma_neg = mass * clamp(1 / (1 - beta_neg * A), adv_low, adv_high)
    w = exp(-(sg[r] - 1)^2 / (2 sigma^2)) on pos (sigma_pos) / neg (sigma_neg) tokens, 1 elsewhere
    loss_tok = -A * w * r          (optionally capped at -A c for A < 0: dual_clip_c)

gate=False is the "no soft gate" ablation: the hard PPO clip with clip_eps instead of w.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from maspo_megatron.algorithms.ratio import clamped_log_ratio, clipped_surrogate, dual_clip_bound
from maspo_megatron.algorithms.registry import register_policy_loss


def maspo_sigma(
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    sigma_base: float,
    alpha: float,
    sigma_high: float,
    adv_low: float,
    adv_high: float,
    beta_pos: float,
    beta_neg: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate widths from old_log_prob[B, T] and advantages[B, T].

    Returns (mass, sigma_pos, sigma_neg), each [B, T]. `mass` is computed in log space and then
    clamped, so old log-probs down to -1e4 (p_old^-alpha = inf) land on sigma_high, not NaN.
    The negative-side factor uses min(A, 0): it equals the formula wherever it is used (A < 0)
    and never divides by zero for large positive A.
    """
    log_mass = math.log(sigma_base) - alpha * old_log_prob
    mass = torch.exp(log_mass).clamp(sigma_base, sigma_high)
    sigma_pos = mass * (1 + beta_pos * advantages).clamp(adv_low, adv_high)
    sigma_neg = mass * (1 / (1 - beta_neg * advantages.clamp(max=0))).clamp(adv_low, adv_high)
    return mass, sigma_pos, sigma_neg


def maspo_gate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mass: torch.Tensor,
    sigma_pos: torch.Tensor,
    sigma_neg: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate weight of each token. ratio[B, T] may carry a gradient (gate_grad="full").

    Returns (w, sigma, pos, neg): w[B, T] in (0, 1] (exactly 1 off the gated sides), the sigma in
    force for the token (sigma_pos if A > 0, sigma_neg if A < 0, mass if A = 0), and the bool
    masks of positive-side and negative-side gated tokens.
    """
    pos = (advantages > 0) & (ratio > 1)
    neg = (advantages < 0) & (ratio < 1)
    sigma = torch.where(advantages > 0, sigma_pos, torch.where(advantages < 0, sigma_neg, mass))
    gaussian = torch.exp(-((ratio - 1) ** 2) / (2 * sigma**2))
    w = torch.where(pos | neg, gaussian, torch.ones_like(gaussian))
    return w, sigma, pos, neg


@register_policy_loss("maspo")
def maspo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    sigma_base: float = 1.0,
    alpha: float = 0.3,
    sigma_high: float = 10.0,
    adv_low: float = 0.1,
    adv_high: float = 10.0,
    beta_pos: float = 0.03,
    beta_neg: float = 0.03,
    gate_grad: str = "detached",
    gate: bool = True,
    clip_eps: float = 0.2,
    dual_clip_c: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MASPO per-token loss (inputs [B, T], prepared by policy_loss). See the module docstring.

    Metrics (per token [B, T]): ratio, gate_weight, sigma, gated_pos, gated_neg, clipped
    (hard clip with gate=False, or the dual-clip cap, cut the gradient).
    """
    if gate_grad not in ("detached", "full"):
        raise ValueError(f"policy_loss 'maspo': gate_grad must be 'detached' or 'full', got {gate_grad!r}")
    for key, value, ok in (
        ("sigma_base", sigma_base, sigma_base > 0),
        ("sigma_high", sigma_high, sigma_high >= sigma_base),
        ("alpha", alpha, alpha >= 0),
        ("adv_low", adv_low, adv_low > 0),
        ("adv_high", adv_high, adv_high >= adv_low),
    ):
        if not ok:
            raise ValueError(f"policy_loss 'maspo': {key}={value!r} is out of range (see MaspoConfig)")
    if dual_clip_c is not None and not dual_clip_c > 1:
        raise ValueError(f"policy_loss 'maspo': dual_clip_c must be > 1 or None, got {dual_clip_c!r}")
    ratio = torch.exp(clamped_log_ratio(log_prob, old_log_prob))
    mass, sigma_pos, sigma_neg = maspo_sigma(
        old_log_prob, advantages, sigma_base=sigma_base, alpha=alpha, sigma_high=sigma_high,
        adv_low=adv_low, adv_high=adv_high, beta_pos=beta_pos, beta_neg=beta_neg,
    )
    gate_ratio = ratio if gate_grad == "full" else ratio.detach()
    w, sigma, pos, neg = maspo_gate(gate_ratio, advantages, mass, sigma_pos, sigma_neg)
    if gate:
        loss = -advantages * w * ratio
        clipped = torch.zeros_like(pos)
    else:
        loss, clipped = clipped_surrogate(ratio, advantages, 1 - clip_eps, 1 + clip_eps)
    if dual_clip_c is not None:
        loss, capped = dual_clip_bound(loss, advantages, dual_clip_c)
        clipped = clipped | capped
    metrics = {
        "ratio": ratio,
        "gate_weight": w,
        "sigma": sigma,
        "gated_pos": pos.to(ratio.dtype),
        "gated_neg": neg.to(ratio.dtype),
        "clipped": clipped.to(ratio.dtype),
    }
    return loss, metrics
