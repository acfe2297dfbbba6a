"""Property tests (hypothesis) of the invariants the losses must keep on ANY input."""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maspo_megatron.algorithms import POLICY_LOSSES, policy_loss
from tests.algorithms._runtime import runtime_inputs

# derandomize: the same examples on every CI run; the machine is shared, so no timing health checks
SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow],
)
ROWS, COLS = 3, 6
N = ROWS * COLS

log_probs = st.floats(min_value=-1e4, max_value=0.0, allow_nan=False)
moderate_log_probs = st.floats(min_value=-8.0, max_value=0.0, allow_nan=False)
advantage_values = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False)
maspo_hyper = st.fixed_dictionaries({
    "sigma_base": st.floats(0.5, 3.0),
    "alpha": st.floats(0.0, 0.6),
    "beta_pos": st.floats(0.0, 0.2),
    "beta_neg": st.floats(0.0, 0.2),
    "gate_grad": st.sampled_from(["detached", "full"]),
})


def _tensor(values, dtype=torch.float32):
    return torch.tensor(values, dtype=torch.float64).reshape(ROWS, COLS).to(dtype)


def _batch(data, lp_strategy, dtype=torch.float32):
    lp = _tensor(data.draw(st.lists(lp_strategy, min_size=N, max_size=N)), dtype)
    old = _tensor(data.draw(st.lists(lp_strategy, min_size=N, max_size=N)), dtype)
    adv = _tensor(data.draw(st.lists(advantage_values, min_size=N, max_size=N)), dtype)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=N, max_size=N))).reshape(ROWS, COLS)
    return lp, old, adv, mask


@SETTINGS
@given(data=st.data(), hyper=maspo_hyper)
def test_gate_weight_in_unit_interval(data, hyper):
    """w in [0, 1] always, w = 1 off the gated sides, and w > 0 wherever exp(-(r-1)^2 / 2 sigma^2)
    is representable in fp32 (beyond, it legitimately underflows to 0)."""
    lp, old, adv, mask = _batch(data, log_probs)
    _, metrics = policy_loss("maspo", lp, old, adv, mask, sigma_high=10.0, **hyper)
    w = metrics["gate_weight"][mask]
    assert ((w >= 0) & (w <= 1)).all()
    gated = (metrics["gated_pos"] + metrics["gated_neg"]).bool()[mask]
    assert (w[~gated] == 1).all()
    ratio, sigma = metrics["ratio"][mask].double(), metrics["sigma"][mask].double()
    representable = (ratio - 1) ** 2 / (2 * sigma**2) < 80
    assert (w[representable] > 0).all()
    assert (w[gated & ((ratio - 1).abs() < 1e-3)] > 0.99).all()  # gated tokens at r ~ 1 keep w ~ 1


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(POLICY_LOSSES)), bf16=st.booleans())
def test_no_nan_for_extreme_inputs(data, name, bf16):
    """log-probs down to -1e4 and |A| up to 1e3 (fp32 or bf16 inputs): finite losses and gradients."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    lp, old, adv, mask = _batch(data, log_probs, dtype)
    lp.requires_grad_()
    loss, metrics = policy_loss(name, lp, old, adv, mask, **runtime_inputs(name, lp))
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(lp.grad.float()).all()
    for key, value in metrics.items():
        assert not torch.isnan(value).any(), key


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(POLICY_LOSSES)))
def test_masked_tokens_contribute_nothing(data, name):
    """Masked positions: loss exactly 0, gradient exactly 0, and garbage there (NaN, -inf) changes
    nothing at the unmasked positions."""
    lp, old, adv, mask = _batch(data, moderate_log_probs)
    garbage_lp, garbage_old, garbage_adv = lp.clone(), old.clone(), adv.clone()
    garbage_lp[~mask], garbage_old[~mask], garbage_adv[~mask] = math.nan, -math.inf, math.inf
    clean_lp = lp.clone().requires_grad_()
    dirty_lp = garbage_lp.requires_grad_()
    clean, _ = policy_loss(name, clean_lp, old, adv, mask, **runtime_inputs(name, lp))
    dirty, _ = policy_loss(name, dirty_lp, garbage_old, garbage_adv, mask, **runtime_inputs(name, lp))
    assert (dirty[~mask] == 0).all() and (clean[~mask] == 0).all()
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    dirty.sum().backward()
    clean.sum().backward()
    assert (dirty_lp.grad[~mask] == 0).all()
    torch.testing.assert_close(dirty_lp.grad, clean_lp.grad, rtol=0, atol=0)


@SETTINGS
@given(data=st.data(), name=st.sampled_from(sorted(POLICY_LOSSES)))
def test_bf16_inputs_give_fp32_results_of_the_upcast_values(data, name):
    lp, old, adv, mask = _batch(data, moderate_log_probs, torch.bfloat16)
    loss, metrics = policy_loss(name, lp, old, adv, mask, **runtime_inputs(name, lp))
    ref, _ = policy_loss(name, lp.float(), old.float(), adv.float(), mask, **runtime_inputs(name, lp))
    assert loss.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in metrics.values())
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)


@SETTINGS
@given(
    old=st.lists(st.floats(-8.0, 0.0), min_size=N, max_size=N),
    adv=st.lists(st.floats(-5.0, 5.0), min_size=N, max_size=N),
    delta_exp=st.integers(3, 6),
    hyper=maspo_hyper,
)
def test_continuity_at_ratio_one(old, adv, delta_exp, hyper):
    """As r -> 1 from either side the MASPO loss and gradient approach the plain PG values -A r."""
    old_t = _tensor(old)
    adv_t = _tensor(adv)
    mask = torch.ones(ROWS, COLS, dtype=torch.bool)
    delta = 10.0**-delta_exp
    for sign in (1.0, -1.0):
        lp = (old_t + sign * delta).requires_grad_()
        loss, metrics = policy_loss("maspo", lp, old_t, adv_t, mask, **hyper)
        loss.sum().backward()
        r, sigma = metrics["ratio"], metrics["sigma"]
        pg = -adv_t * r
        # |loss - pg| = |A| r (1 - w) <= |A| r (r - 1)^2 / (2 sigma^2): second order in delta.
        # The full gate's gradient adds |A| w r^2 |r - 1| / sigma^2: first order, still -> 0.
        gap = (r - 1).abs()
        fp32_slack = 1e-6 * adv_t.abs() * r
        assert ((loss - pg).abs() <= adv_t.abs() * r * gap**2 / (2 * sigma**2) + fp32_slack).all()
        grad_gap = gap**2 / (2 * sigma**2) + (r * gap / sigma**2 if hyper["gate_grad"] == "full" else 0)
        assert ((lp.grad - pg).abs() <= adv_t.abs() * r * grad_gap * 1.001 + fp32_slack).all()
        assert gap.max() < 3 * delta


@SETTINGS
@given(
    lp_old=st.lists(st.tuples(st.floats(-8.0, 0.0), st.floats(-3.0, 3.0)), min_size=N, max_size=N),
    magnitude_exp=st.integers(3, 9),
    hyper=maspo_hyper,
)
def test_continuity_at_zero_advantage(lp_old, magnitude_exp, hyper):
    """A -> 0 from either side: loss -> 0 like |A| r, and both gate widths tend to the mass term."""
    old = _tensor([o for o, _ in lp_old])
    lp = old + _tensor([d for _, d in lp_old])
    mask = torch.ones(ROWS, COLS, dtype=torch.bool)
    eps = 10.0**-magnitude_exp
    sigmas = []
    for sign in (1.0, -1.0):
        adv = torch.full((ROWS, COLS), sign * eps)
        loss, metrics = policy_loss("maspo", lp, old, adv, mask, **hyper)
        assert (loss.abs() <= eps * metrics["ratio"] * (1 + 1e-6)).all()
        sigmas.append(metrics["sigma"])
    _, at_zero = policy_loss("maspo", lp, old, torch.zeros(ROWS, COLS), mask, **hyper)
    for sigma in sigmas:
        # sigma_pos = mass (1 + beta A), sigma_neg = mass / (1 - beta A): off by at most beta |A| <= 0.2 eps
        torch.testing.assert_close(sigma, at_zero["sigma"], rtol=0.2 * eps * 1.01 + 1e-6, atol=0)


@SETTINGS
@given(
    lp_old=st.lists(st.tuples(st.floats(-10.0, 0.0), st.floats(-3.0, 3.0)), min_size=N, max_size=N),
    adv=st.lists(st.floats(-10.0, 10.0), min_size=N, max_size=N),
    gate_grad=st.sampled_from(["detached", "full"]),
)
def test_large_sigma_base_is_plain_policy_gradient(lp_old, adv, gate_grad):
    old = _tensor([o for o, _ in lp_old])
    lp = (old + _tensor([d for _, d in lp_old])).requires_grad_()
    adv_t = _tensor(adv)
    mask = torch.ones(ROWS, COLS, dtype=torch.bool)
    loss, _ = policy_loss("maspo", lp, old, adv_t, mask, sigma_base=1e4, sigma_high=1e4, gate_grad=gate_grad)
    loss.sum().backward()
    pg = -adv_t * torch.exp(lp.detach() - old)
    torch.testing.assert_close(loss.detach(), pg, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad, pg, rtol=1e-5, atol=1e-6)
