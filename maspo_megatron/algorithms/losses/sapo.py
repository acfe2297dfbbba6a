"""SAPO: a soft sigmoid gate instead of the hard clip.

    f(r) = sigmoid(tau (r - 1)) * 4 / tau,   tau = tau_pos if A > 0 else tau_neg
    loss_tok = -A f(r)
d loss_tok / d logp = -A r * 4 sigmoid(tau (r - 1)) (1 - sigmoid(tau (r - 1))): at r = 1 this
is the plain policy gradient -A, and it decays smoothly as r moves away from 1.
"""
from __future__ import annotations

import dataclasses

import torch

from maspo_megatron.algorithms.hyper import option
from maspo_megatron.algorithms.ratio import clamped_log_ratio
from maspo_megatron.algorithms.registry import register_policy_loss


@dataclasses.dataclass
class SapoHyper:
    tau_pos: float = option(1.0, gt=0)
    tau_neg: float = option(1.05, gt=0)


@register_policy_loss("sapo", SapoHyper)
def sapo_loss(log_prob, old_log_prob, advantages, mask, *, tau_pos: float, tau_neg: float):
    """SAPO per-token loss. Inputs [B, T]; metrics per token: ratio, gate_weight (f'(r), 1 at r = 1)."""
    ratio = torch.exp(clamped_log_ratio(log_prob, old_log_prob))
    tau = torch.where(
        advantages > 0,
        torch.as_tensor(tau_pos, dtype=ratio.dtype, device=ratio.device),
        torch.as_tensor(tau_neg, dtype=ratio.dtype, device=ratio.device),
    )
    z = tau * (ratio - 1)
    # exp(logsigmoid(z)) instead of sigmoid(z): same value, but autograd then forms the slope
    # sigmoid(z) sigmoid(-z) without the cancellation in sigmoid's own backward, y (1 - y), which
    # loses all digits once y rounds to 1 in fp32 (z > ~17).
    gate = torch.exp(torch.nn.functional.logsigmoid(z))
    loss = -advantages * gate * (4 / tau)
    slope = (4 * gate * torch.sigmoid(-z)).detach()
    return loss, {"ratio": ratio, "gate_weight": slope}
