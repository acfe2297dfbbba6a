"""MASPO: the worked values of ../shared/MASPO.md, closed-form gradients, finite differences for
the differentiable gate, the ablation switches, the dual-clip safety valve, fp32 from bf16/fp16."""
from __future__ import annotations

import math

import pytest
import torch

from maspo_megatron.algorithms import policy_loss

# (p, p_old, A, sigma, w, loss_tok = gradient) from the MASPO.md table, default hyperparameters.
WORKED = [
    (0.5, 0.25, 2.0, 1.60666, 0.823908, -3.29563),
    (0.1, 0.4, -1.5, 1.25970, 0.837579, 0.314092),
    (0.6, 0.3, -1.0, None, 1.0, 2.0),
]


def _run(p, p_old, adv, dtype=torch.float32, **hyper):
    """Lists of per-token values -> one row [1, n]; returns loss[n], grad[n], metrics (each [n])."""
    log_prob = torch.tensor([p], dtype=torch.float64).log().to(dtype).requires_grad_()
    old = torch.tensor([p_old], dtype=torch.float64).log().to(dtype)
    adv_t = torch.tensor([adv], dtype=dtype)
    mask = torch.ones_like(adv_t, dtype=torch.bool)
    loss, metrics = policy_loss("maspo", log_prob, old, adv_t, mask, **hyper)
    loss.sum().backward()
    return loss[0], log_prob.grad[0], {key: value[0] for key, value in metrics.items()}


@pytest.mark.parametrize("p,p_old,adv,sigma,w,expected", WORKED)
def test_worked_values(p, p_old, adv, sigma, w, expected):
    loss, grad, metrics = _run([p], [p_old], [adv])
    assert loss.item() == pytest.approx(expected, rel=2e-6)
    assert grad.item() == pytest.approx(expected, rel=2e-6)  # d loss / d logp = -A w r = loss
    assert metrics["gate_weight"].item() == pytest.approx(w, rel=2e-6)
    if sigma is not None:
        assert metrics["sigma"].item() == pytest.approx(sigma, rel=5e-6)
        assert metrics["gated_pos"].item() + metrics["gated_neg"].item() == 1
    else:
        assert metrics["gated_pos"].item() == metrics["gated_neg"].item() == 0


def test_full_gate_closed_form_gradient():
    """gate_grad=full: d/dlogp = -A w r (1 - r (r - 1) / sigma^2) on gated tokens (MASPO.md)."""
    for p, p_old, adv, sigma, w, _ in WORKED[:2]:
        loss, grad, _ = _run([p], [p_old], [adv], gate_grad="full")
        r = p / p_old
        assert loss.item() == pytest.approx(-adv * w * r, rel=2e-6)  # the value does not change
        assert grad.item() == pytest.approx(-adv * w * r * (1 - r * (r - 1) / sigma**2), rel=1e-5)


def test_full_gate_matches_finite_differences_in_float64():
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 16, generator=gen, dtype=torch.float64) * 4
    log_prob = (old + 0.7 * torch.randn(4, 16, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.5], [-0.7], [2.5], [-3.0]], dtype=torch.float64).expand(4, 16)
    mask = torch.rand(4, 16, generator=gen) < 0.9
    for hyper in ({}, dict(sigma_base=0.5, alpha=0.5, beta_pos=0.2, beta_neg=0.2, dual_clip_c=2.0)):
        loss, metrics = policy_loss("maspo", log_prob, old, adv, mask, gate_grad="full", **hyper)
        assert loss.dtype == torch.float64 and metrics["gated_pos"].any() and metrics["gated_neg"].any()
        assert torch.autograd.gradcheck(
            lambda lp, h=hyper: policy_loss("maspo", lp, old, adv, mask, gate_grad="full", **h)[0],
            (log_prob,), eps=1e-6, atol=1e-8, rtol=1e-6,
        )


def test_detached_gate_gradient_is_minus_a_w_r():
    gen = torch.Generator().manual_seed(4)
    old = -torch.rand(3, 10, generator=gen) * 3
    log_prob = (old + 0.5 * torch.randn(3, 10, generator=gen)).requires_grad_()
    adv = torch.tensor([[1.0], [-2.0], [0.5]]).expand(3, 10)
    mask = torch.ones(3, 10, dtype=torch.bool)
    loss, metrics = policy_loss("maspo", log_prob, old, adv, mask)
    loss.sum().backward()
    expected = -adv * metrics["gate_weight"] * metrics["ratio"]
    torch.testing.assert_close(log_prob.grad, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=0)


def test_ablation_alpha_zero_and_beta_zero_give_sigma_base():
    loss, _, metrics = _run([0.5, 0.05], [0.25, 0.01], [2.0, -3.0], alpha=0.0, beta_pos=0.0, beta_neg=0.0, sigma_base=1.5)
    torch.testing.assert_close(metrics["sigma"], torch.tensor([1.5, 1.5]))
    r = torch.tensor([2.0, 5.0])
    gated = torch.tensor([True, False])  # A<0 with r>1 is not gated
    w = torch.where(gated, torch.exp(-((r - 1) ** 2) / (2 * 1.5**2)), torch.ones(2))
    torch.testing.assert_close(loss.detach(), -torch.tensor([2.0, -3.0]) * w * r, rtol=1e-6, atol=0)


def test_mass_and_risk_clamps():
    # p_old = 1e-6: sigma_base / p_old^0.3 = 63 -> clamped to sigma_high = 10; A = 100: 1 + 3 = 4
    _, _, metrics = _run([0.5], [1e-6], [100.0])
    assert metrics["sigma"].item() == pytest.approx(10 * 4.0, rel=1e-6)
    # A = 1000: 1 + 30 -> adv_high = 10; A = -1000 on the negative side: 1 / 31 -> adv_low = 0.1
    _, _, metrics = _run([0.5, 1e-7], [1e-6, 0.5], [1000.0, -1000.0])
    assert metrics["sigma"].tolist() == pytest.approx([100.0, 0.5**-0.3 * 0.1], rel=1e-6)


def test_gate_off_is_hard_ppo_clip():
    p_old = [0.5, 0.5, 0.5, 0.5]
    p = [0.75, 0.55, 0.3, 0.45]  # r = 1.5, 1.1, 0.6, 0.9
    adv = [1.0, 1.0, -1.0, -1.0]
    loss, grad, metrics = _run(p, p_old, adv, gate=False, clip_eps=0.2)
    # -min(rA, clip(r)A): clipped at 1.2 / 0.8 with zero gradient
    assert loss.tolist() == pytest.approx([-1.2, -1.1, 0.8, 0.9], rel=1e-6)
    assert grad.tolist() == pytest.approx([0.0, -1.1, 0.0, 0.9], rel=1e-6)
    assert metrics["clipped"].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_dual_clip_bounds_negative_advantage_with_large_ratio():
    # A < 0 and r = 8 is not gated: -A r = 8 unbounded by default, capped at -A c = 3 with c = 3
    loss, grad, _ = _run([0.8], [0.1], [-1.0])
    assert loss.item() == pytest.approx(8.0, rel=1e-6) and grad.item() == pytest.approx(8.0, rel=1e-6)
    loss, grad, metrics = _run([0.8], [0.1], [-1.0], dual_clip_c=3.0)
    assert loss.item() == pytest.approx(3.0) and grad.item() == 0.0 and metrics["clipped"].item() == 1.0
    loss, grad, _ = _run([0.2], [0.1], [-1.0], dual_clip_c=3.0)  # r = 2 < c: untouched
    assert loss.item() == pytest.approx(2.0, rel=1e-6) and grad.item() == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_fp32_results(dtype):
    # r = exp(20) with |A| = 1e3 overflows fp16 (max 65504): computed in fp32 it stays finite
    log_prob = torch.tensor([[0.0, -0.5, -3.0, -1e4]], dtype=dtype).requires_grad_()
    old = torch.tensor([[-25.0, -0.25, -1.0, -5.0]], dtype=dtype)
    adv = torch.tensor([[1e3, -2.0, 2.0, -1e3]], dtype=dtype)
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = policy_loss("maspo", log_prob, old, adv, mask)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in metrics.values())
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert log_prob.grad.dtype == dtype and torch.isfinite(log_prob.grad.float()).all()
    # upcast first, then the same math as fp32 inputs holding the same values
    ref, _ = policy_loss("maspo", log_prob.detach().float(), old.float(), adv.float(), mask)
    torch.testing.assert_close(loss.detach(), ref, rtol=0, atol=0)
    assert loss[0, 0].item() == pytest.approx(-1e3 * math.exp(20) * metrics["gate_weight"][0, 0].item(), rel=1e-5)
