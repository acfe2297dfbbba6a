"""kl_penalty against an independent float64 reference (plain math, derivatives by hand)."""
from __future__ import annotations

import math

import pytest
import torch

from maspo_megatron.algorithms import KL_ESTIMATORS, kl_penalty
from maspo_megatron.config.algorithm import KL_ESTIMATORS as CONFIG_KL_ESTIMATORS


def _reference(lp: float, ref: float, estimator: str) -> tuple[float, float]:
    """(value, d value / d lp) of one token."""
    x = lp - ref
    if estimator == "k1":
        return x, 1.0
    if estimator == "k2":
        return 0.5 * x * x, x
    inside = -20.0 <= x <= 20.0
    xc = min(max(x, -20.0), 20.0)
    value = math.exp(-xc) - 1 + xc
    slope = (1 - math.exp(-xc)) if inside else 0.0
    if value > 10.0:  # the output clamp at 10 (the value is >= 0, so -10 never binds)
        return 10.0, 0.0
    return value, slope


def test_estimator_names_match_config():
    assert tuple(KL_ESTIMATORS) == tuple(CONFIG_KL_ESTIMATORS)


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_matches_float64_reference_value_and_gradient(estimator):
    gen = torch.Generator().manual_seed(3)
    ref = -torch.empty(6, 40).exponential_(0.5, generator=gen)
    log_prob = (ref + 0.7 * torch.randn(6, 40, generator=gen)).requires_grad_()
    log_prob.data[0, :3] = torch.tensor([ref[0, 0] + 25.0, ref[0, 1] - 25.0, ref[0, 2] - 5.0])  # clamps
    weights = torch.rand(6, 40, generator=gen) + 0.5
    out = kl_penalty(log_prob, ref, estimator)
    (out * weights).sum().backward()
    expected = [[_reference(a, b, estimator) for a, b in zip(row_lp, row_ref, strict=True)]
                for row_lp, row_ref in zip(log_prob.detach().double().tolist(), ref.double().tolist(), strict=True)]
    value = torch.tensor([[v for v, _ in row] for row in expected], dtype=torch.float64)
    grad = torch.tensor([[g for _, g in row] for row in expected], dtype=torch.float64) * weights.double()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_prob.grad.double(), grad, rtol=1e-5, atol=1e-6)


def test_zero_at_the_reference_and_k3_is_low_var_kl():
    lp = torch.randn(3, 5)
    for estimator in KL_ESTIMATORS:
        assert (kl_penalty(lp, lp, estimator) == 0).all(), estimator
    ref = lp + torch.randn(3, 5)
    assert torch.equal(kl_penalty(lp, ref, "k3"), kl_penalty(lp, ref, "low_var_kl"))
    assert (kl_penalty(lp, ref, "low_var_kl") >= 0).all()
    with pytest.raises(ValueError, match="unknown estimator 'k4'"):
        kl_penalty(lp, ref, "k4")
    with pytest.raises(ValueError, match="ref_log_prob has shape"):
        kl_penalty(lp, ref[:, :2], "k1")
