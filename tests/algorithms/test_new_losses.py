"""Entropy-Advantage, BAPO and CISPO on hand-computed cases (the random-batch comparison with the
float64 reference is in test_reference_match.py); values worked out on paper."""
from __future__ import annotations

import math

import pytest
import torch

from maspo_megatron.algorithms import policy_loss
from maspo_megatron.algorithms.losses.bapo import bapo_bound_path, bapo_contribution_sums


def _row(name, p, p_old, adv, **hyper):
    log_prob = torch.tensor([p], dtype=torch.float64).log().requires_grad_()
    old = torch.tensor([p_old], dtype=torch.float64).log()
    adv_t = torch.tensor([adv], dtype=torch.float64)
    loss, metrics = policy_loss(name, log_prob, old, adv_t, torch.ones_like(adv_t, dtype=torch.bool), **hyper)
    loss.sum().backward()
    return loss[0].tolist(), log_prob.grad[0].tolist(), {k: v[0].tolist() for k, v in metrics.items()}


def test_entropy_adv_bonus_is_clipped_by_the_advantage():
    # r = 1 everywhere; H = [2, 0.5, 3, 1]; A = [1, 1, -1, 0]; alpha 0.4, kappa 2:
    # bonus = min(0.4 H, |A| / 2) = [0.5, 0.2, 0.5, 0] -> A' = [1.5, 1.2, -0.5, 0]
    entropy = torch.tensor([[2.0, 0.5, 3.0, 1.0]], dtype=torch.float64)
    loss, grad, metrics = _row("entropy_adv", [0.5] * 4, [0.5] * 4, [1.0, 1.0, -1.0, 0.0], entropy=entropy)
    assert metrics["shaped_advantage"] == pytest.approx([1.5, 1.2, -0.5, 0.0], rel=1e-12)
    assert loss == pytest.approx([-1.5, -1.2, 0.5, 0.0], rel=1e-12)
    assert grad == pytest.approx([-1.5, -1.2, 0.5, 0.0], rel=1e-12)
    # the entropy is a constant: no gradient reaches it
    entropy_leaf = entropy.float().requires_grad_()
    log_prob = torch.zeros(1, 4, requires_grad=True)
    out, _ = policy_loss("entropy_adv", log_prob, torch.zeros(1, 4), torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool),
                         entropy=entropy_leaf)
    out.sum().backward()
    assert entropy_leaf.grad is None and log_prob.grad is not None
    with pytest.raises(ValueError, match="needs entropy of shape \\(1, 4\\)"):
        policy_loss("entropy_adv", log_prob, torch.zeros(1, 4), torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool))


def test_cispo_keeps_the_gradient_where_ppo_clips():
    # r = 1.5 with A = 1: PPO clips (no gradient); CISPO's weight is clip(1.5, 0, 1.28) = 1.28, grad -1.28
    # r = 0.5 with A = -1 and eps_low = 0.2: weight 0.8, grad 0.8; value -w A log p
    loss, grad, metrics = _row("cispo", [0.75, 0.25], [0.5, 0.5], [1.0, -1.0], eps_low=0.2)
    assert grad == pytest.approx([-1.28, 0.8], rel=1e-12)
    assert loss == pytest.approx([-1.28 * math.log(0.75), 0.8 * math.log(0.25)], rel=1e-12)
    assert metrics["clipped"] == [1.0, 1.0]
    _, grad, _ = _row("cispo", [0.25], [0.5], [-1.0])  # default eps_low = 1: no lower bound
    assert grad == pytest.approx([0.5], rel=1e-12)


def test_bapo_bound_path_and_choice():
    lows, highs = bapo_bound_path(0.6, 0.9, 0.1, 1.2, 1.5, 0.1, dtype=torch.float64)
    assert lows.tolist() == pytest.approx([0.6, 0.7, 0.8, 0.9]) and highs.tolist() == pytest.approx([1.2, 1.3, 1.4, 1.5])
    # one positive token with r = 1.5, A = 1; one negative token with r = 0.5, A = -1:
    # k=0: P = 1.2, N = 0.6 -> share 2/3; k=1: P = 1.3, N = 0.7 -> 0.65; ... share never reaches 0.7 -> last
    hyper = dict(low_start=0.6, low_max=0.9, low_step=0.1, high_start=1.2, high_max=1.5, high_step=0.1)
    loss, grad, metrics = _row("bapo", [0.75, 0.25], [0.5, 0.5], [1.0, -1.0], rho_target=0.7, **hyper)
    assert metrics["clip_high"] == pytest.approx([1.5, 1.5]) and metrics["clip_low"] == pytest.approx([0.9, 0.9])
    assert loss == pytest.approx([-1.5, 0.9]) and grad == pytest.approx([-1.5, 0.0])
    # a target met at once keeps the start bounds
    _, _, metrics = _row("bapo", [0.75, 0.25], [0.5, 0.5], [1.0, -1.0], rho_target=0.6, **hyper)
    assert metrics["clip_high"] == pytest.approx([1.2, 1.2]) and metrics["clip_low"] == pytest.approx([0.6, 0.6])
    # the sums a distributed caller all-reduces decide the bounds: two shards' sums added = the whole batch's
    lp = torch.tensor([[0.75, 0.25]]).log()
    old, adv, mask = torch.full((1, 2), 0.5).log(), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool)
    halves = [bapo_contribution_sums(lp[:, i:i + 1], old[:, i:i + 1], adv[:, i:i + 1], mask[:, i:i + 1], **hyper)
              for i in range(2)]
    whole = bapo_contribution_sums(lp, old, adv, mask, **hyper)
    torch.testing.assert_close(halves[0] + halves[1], whole)
    assert whole[0].tolist() == pytest.approx([1.2, 0.6])
    # the positive shard alone (share 1) would keep the start bounds; with the global sums it must not
    _, metrics = policy_loss("bapo", lp[:, :1], old[:, :1], adv[:, :1], mask[:, :1], rho_target=0.7,
                             batch_sums=whole, **hyper)
    assert metrics["clip_high"].item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="batch_sums must have shape \\(4, 2\\)"):
        policy_loss("bapo", lp, old, adv, mask, batch_sums=whole[:2], **hyper)
    with pytest.raises(ValueError, match="low_start <= low_max"):
        bapo_bound_path(0.9, 0.6, 0.1, 1.2, 1.5, 0.1)
