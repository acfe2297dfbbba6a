"""Each baseline against its formula on small hand-computed cases (values worked out on paper;
the few transcendental numbers were evaluated once with a pocket calculator / `math`)."""
from __future__ import annotations

import math

import pytest
import torch

from maspo_megatron.algorithms import aggregate_loss, policy_loss
from maspo_megatron.algorithms.losses.ppo import dac_bounds


def _row(name, p, p_old, adv, mask=None, **hyper):
    """Lists of probabilities -> loss[n], grad[n], metrics of one row [1, n]."""
    log_prob = torch.tensor([p], dtype=torch.float64).log().float().requires_grad_()
    old = torch.tensor([p_old], dtype=torch.float64).log().float()
    adv_t = torch.tensor([adv])
    mask_t = torch.ones_like(adv_t, dtype=torch.bool) if mask is None else torch.tensor([mask])
    loss, metrics = policy_loss(name, log_prob, old, adv_t, mask_t, **hyper)
    loss.sum().backward()
    return loss[0].tolist(), log_prob.grad[0].tolist(), {k: v[0].tolist() for k, v in metrics.items()}


# p_old = 0.5 everywhere: r = 2 p
P_OLD = [0.5] * 6
P = [0.75, 0.55, 0.3, 0.45, 0.3, 0.75]  # r = 1.5, 1.1, 0.6, 0.9, 0.6, 1.5
ADV = [1.0, 1.0, -1.0, -1.0, 2.0, -2.0]


def test_grpo():
    loss, grad, metrics = _row("grpo", P, P_OLD, ADV)
    # A>0: -A min(r, 1.2); A<0: -A max(r, 0.8); the clipped side has zero gradient
    assert loss == pytest.approx([-1.2, -1.1, 0.8, 0.9, -1.2, 3.0], rel=1e-6)
    assert grad == pytest.approx([0.0, -1.1, 0.0, 0.9, -1.2, 3.0], rel=1e-6)
    assert metrics["clipped"] == [1, 0, 1, 0, 0, 0]
    loss, _, _ = _row("grpo", P, P_OLD, ADV, eps=0.45)
    assert loss == pytest.approx([-1.45, -1.1, 0.6, 0.9, -1.2, 3.0], rel=1e-6)


def test_clip_higher():
    p = [0.625, 0.7, 0.35, 0.3]  # r = 1.25, 1.4, 0.7, 0.6
    loss, grad, _ = _row("clip_higher", p, [0.5] * 4, [1.0, 1.0, -1.0, 2.0])
    # upper bound 1.28 (GRPO would clip 1.25 at 1.2), lower bound 0.8
    assert loss == pytest.approx([-1.25, -1.28, 0.8, -1.2], rel=1e-6)
    assert grad == pytest.approx([-1.25, 0.0, 0.0, -1.2], rel=1e-6)


def test_dual_clip():
    p = [0.4, 0.2, 0.4, 0.45]  # p_old = 0.1: r = 4, 2, 4; then r = 4.5
    loss, grad, metrics = _row("dual_clip", p, [0.1] * 4, [-1.0, -1.0, 1.0, -2.0])
    # A<0: min(-A max(r, 0.8), -A c) with c = 3; A>0 as PPO
    assert loss == pytest.approx([3.0, 2.0, -1.2, 6.0], rel=1e-6)
    assert grad == pytest.approx([0.0, 2.0, 0.0, 0.0], rel=1e-6)
    assert metrics["dual_clipped"] == [1, 0, 0, 1]
    loss, _, _ = _row("dual_clip", p, [0.1] * 4, [-1.0, -1.0, 1.0, -2.0], c=5.0)
    assert loss == pytest.approx([4.0, 2.0, -1.2, 9.0], rel=1e-6)


def test_dac_bounds_depend_on_p_old():
    # p_old = 1: bounds [0.5 + 0.5 sqrt(1 - 0.64), 0.5 + 0.5 sqrt(1.8)] = [0.8, 1.1708204]
    # p_old = 0.5: [0.5 + 0.5 sqrt(max(1 - 1.28, 0)), 0.5 + 0.5 sqrt(2.6)] = [0.5, 1.3062258]
    p = [1.5, 0.7, 0.625, 0.3, 0.7]
    p_old = [1.0, 1.0, 0.5, 0.5, 0.5]  # r = 1.5, 0.7, 1.25, 0.6, 1.4
    loss, grad, metrics = _row("dac", p, p_old, [1.0, -1.0, 1.0, -1.0, 1.0])
    assert loss == pytest.approx([-1.1708204, 0.8, -1.25, 0.6, -1.3062258], rel=1e-6)
    assert grad == pytest.approx([0.0, 0.0, -1.25, 0.6, 0.0], rel=1e-6)
    assert metrics["clipped"] == [1, 1, 0, 0, 1]
    low, high = dac_bounds(torch.tensor([0.0, math.log(0.5), -1e4]), 0.16, 0.2)
    assert low.tolist() == pytest.approx([0.8, 0.5, 0.5], rel=1e-6)
    assert high.tolist()[:2] == pytest.approx([1.1708204, 1.3062258], rel=1e-6) and high[2] == math.inf


def test_sapo():
    # tau_pos = 1, r = 2, A = 1: f = 4 sigmoid(1) = 2.9242343; f' r = 4 s (1 - s) 2 = 1.5728955
    # tau_neg = 1.05, r = 0.5, A = -1: f = sigmoid(-0.525) 4 / 1.05 = 1.4159383; grad 0.4670699
    # r = 1: f = 2 / tau, gradient = plain policy gradient -A
    loss, grad, metrics = _row("sapo", [0.8, 0.2, 0.4, 0.4], [0.4, 0.4, 0.4, 0.4], [1.0, -1.0, 3.0, -3.0])
    assert loss == pytest.approx([-2.9242343, 1.4159383, -6.0, 3 * 2 / 1.05], rel=1e-6)
    assert grad == pytest.approx([-1.5728955, 0.4670699, -3.0, 3.0], rel=1e-6)
    assert metrics["gate_weight"][2:] == pytest.approx([1.0, 1.0])


def test_gspo_sequence_ratio_over_the_mask():
    # log r = [0.1, -0.1, 0.3, 0.1] on the mask (mean 0.1), and 3.0 on a masked token that must not count
    p_old = [0.5] * 5
    p = [0.5 * math.exp(x) for x in (0.1, -0.1, 0.3, 0.1, 3.0)]
    s = math.exp(0.1)
    mask = [True, True, True, True, False]
    loss, grad, metrics = _row("gspo", p, p_old, [1.0] * 5, mask, eps_low=0.2, eps_high=0.2)
    assert loss == pytest.approx([-s] * 4 + [0.0], rel=1e-6)
    assert grad == pytest.approx([-s] * 4 + [0.0], rel=1e-6)  # GSPO-token: s through the token's own log r
    assert metrics["ratio"][:4] == pytest.approx([s] * 4, rel=1e-6)
    # default eps 3e-4 / 4e-4: s = 1.105 is clipped for A > 0 (value 1.0004, no gradient) but not for A < 0
    loss, grad, _ = _row("gspo", p, p_old, [1.0] * 5, mask)
    assert loss == pytest.approx([-1.0004] * 4 + [0.0], rel=1e-6) and grad == [0.0] * 5
    loss, grad, _ = _row("gspo", p, p_old, [-2.0] * 5, mask)
    assert loss == pytest.approx([2 * s] * 4 + [0.0], rel=1e-6) and grad == pytest.approx([2 * s] * 4 + [0.0])


def test_gspo_aggregates_to_sequence_level_gspo():
    """seq-mean-token-mean of GSPO-token == -A s with s = exp(mean log r) differentiated through the mean."""
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 12, generator=gen, dtype=torch.float64) * 2
    log_prob = (old + 0.01 * torch.randn(3, 12, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0], [-0.5], [2.0]], dtype=torch.float64).expand(3, 12)
    mask = torch.rand(3, 12, generator=gen) < 0.8
    loss, _ = policy_loss("gspo", log_prob, old, adv, mask, eps_low=0.2, eps_high=0.2)
    aggregate_loss(loss, mask, "seq-mean-token-mean").backward()
    ours = log_prob.grad.clone()
    log_prob.grad = None
    n = mask.sum(-1)
    seq_ratio = torch.exp(((log_prob - old) * mask).sum(-1) / n)
    (-(adv[:, 0] * seq_ratio).sum() / 3).backward()
    torch.testing.assert_close(ours, log_prob.grad * mask, rtol=1e-12, atol=1e-15)


def test_gspo_split_sequence_with_seq_log_ratio_matches_whole_row():
    """A sequence cut into two shards (context parallel) with the full-sequence mean passed in gives
    the same per-token losses and gradients as the whole row."""
    gen = torch.Generator().manual_seed(1)
    old = -torch.rand(1, 10, generator=gen) * 2
    log_prob = (old + 0.02 * torch.randn(1, 10, generator=gen)).requires_grad_()
    adv = torch.full((1, 10), -1.0)
    mask = torch.ones(1, 10, dtype=torch.bool)
    hyper = dict(eps_low=0.01, eps_high=0.01)
    whole, _ = policy_loss("gspo", log_prob, old, adv, mask, **hyper)
    whole.sum().backward()
    grad_whole = log_prob.grad.clone()
    log_prob.grad = None
    seq = (log_prob - old).mean(-1, keepdim=True).expand(1, 10)  # with grad, as a caller may pass it
    parts = [
        policy_loss("gspo", log_prob[:, sl], old[:, sl], adv[:, sl], mask[:, sl], seq_log_ratio=seq[:, sl], **hyper)[0]
        for sl in (slice(0, 4), slice(4, 10))
    ]
    torch.cat(parts, dim=1).sum().backward()
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(log_prob.grad, grad_whole, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="seq_log_ratio"):
        policy_loss("gspo", log_prob, old, adv, mask, seq_log_ratio=seq[:, :3])
