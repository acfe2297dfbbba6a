"""Per-token KL penalty to a frozen reference policy (J. Schulman, "Approximating KL divergence", 2020).

With x = log_prob - ref_log_prob (log p_theta / p_ref of the sampled token):

    k1:         x                                    unbiased for KL(theta || ref), high variance
    k2:         x^2 / 2
    low_var_kl: clamp(exp(-x') - 1 + x', -10, 10)    x' = clamp(x, -20, 20): unbiased, >= 0, low variance
    k3:         the same as low_var_kl (verl's `kl_penalty` treats "k3" and "low_var_kl" as one estimator)

These are verl's definitions (`core_algos.kl_penalty_forward`). The term is differentiated as it is
(no straight-through substitution); the caller aggregates it like the policy loss and adds
`kl_coef` times it.
"""
from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
_LOG_RATIO_LIMIT = 20.0
_K3_LIMIT = 10.0


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL term [B, T] from log_prob[B, T] (carries the gradient) and ref_log_prob[B, T] (constant).

    Computed in fp32 (fp64 for fp64 inputs); masked positions are the caller's to ignore.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_penalty: unknown estimator {estimator!r} (expected one of {list(KL_ESTIMATORS)})")
    if log_prob.shape != ref_log_prob.shape:
        raise ValueError(f"kl_penalty: ref_log_prob has shape {tuple(ref_log_prob.shape)}, "
                         f"log_prob has {tuple(log_prob.shape)}")
    dtype = torch.promote_types(log_prob.dtype, torch.float32)
    x = log_prob.to(dtype) - ref_log_prob.detach().to(dtype)
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x.square()
    x = x.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    return (torch.exp(-x) - 1 + x).clamp(-_K3_LIMIT, _K3_LIMIT)
