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

import dataclasses
import math
from typing import Optional

import torch

from maspo_megatron.algorithms.hyper import option
from maspo_megatron.algorithms.ratio import clamped_log_ratio, clipped_surrogate, dual_clip_bound
from maspo_megatron.algorithms.registry import register_policy_loss


@dataclasses.dataclass
class MaspoHyper:
    """algorithm.maspo; defaults follow ../shared/MASPO.md (the official MASPO code)."""

    sigma_base: float = option(1.0, gt=0, help="base trust-region width of the Gaussian gate")
    alpha: float = option(0.3, ge=0, help="mass-adaptive exponent: sigma = sigma_base / p_old^alpha; 0 turns it off")
    sigma_high: float = option(10.0, gt=0, help="upper clamp of the mass-adaptive sigma")
    adv_low: float = option(0.1, gt=0, help="lower clamp of the asymmetric risk factor")
    adv_high: float = option(10.0, gt=0, help="upper clamp of the asymmetric risk factor")
    beta_pos: float = option(0.03, ge=0, help="widening of the region for positive advantages")
    beta_neg: float = option(0.03, ge=0, help="narrowing of the region for negative advantages")
    gate_grad: str = option("detached", choices=("detached", "full"), help="gradient through the gate weight or not")
    gate: bool = option(True, help="false: hard PPO clip instead of the soft gate (ablation)")
    clip_eps: float = option(0.2, gt=0, help="clip epsilon used when gate=false")
    dual_clip_c: Optional[float] = option(None, gt=1, help="optional bound of the loss for A<0 and r>1 (off by default)")

    def validate(self) -> None:
        if self.sigma_high < self.sigma_base:
            raise ValueError(f"sigma_high: {self.sigma_high} must be >= sigma_base ({self.sigma_base})")
        if self.adv_high < self.adv_low:
            raise ValueError(f"adv_high: {self.adv_high} must be >= adv_low ({self.adv_low})")


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


@register_policy_loss("maspo", MaspoHyper)
def maspo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    sigma_base: float,
    alpha: float,
    sigma_high: float,
    adv_low: float,
    adv_high: float,
    beta_pos: float,
    beta_neg: float,
    gate_grad: str,
    gate: bool,
    clip_eps: float,
    dual_clip_c: Optional[float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MASPO per-token loss (inputs [B, T], prepared by policy_loss; hyperparameters checked against
    MaspoHyper). See the module docstring.

    Metrics (per token [B, T]): ratio, gate_weight, sigma, gated_pos, gated_neg, clipped
    (hard clip with gate=False, or the dual-clip cap, cut the gradient).
    """
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
