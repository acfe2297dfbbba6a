"""MASPO statistics: hand-computed sums on a small batch, additivity over shards, finalized names."""
from __future__ import annotations

import math

import pytest
import torch

from maspo_megatron.algorithms import finalize_statistics, maspo_statistics

# (p_old, p, A, mask): one token per p_old bucket and both gated sides, defaults of MASPO.md
TOKENS = [
    (0.25, 0.5, 2.0, True),    # r = 2, gated pos, w = 0.823908, sigma 1.60666, PPO-clipped
    (0.4, 0.1, -1.5, True),    # r = 0.25, gated neg, w = 0.837579, sigma 1.25970, PPO-clipped
    (0.6, 0.9, -1.0, True),    # r = 1.5, A < 0: not gated
    (1e-5, 1e-5, 0.5, True),   # r = 1: not gated; mass 1e-5^-0.3 = 31.6 -> clamped at sigma_high
    (0.05, 0.0, 1.0, False),   # masked (log 0 = -inf must not leak)
    (0.05, 0.02, 1.0, True),   # r = 0.4, A > 0: not gated
]


def _batch():
    p_old, p, adv, mask = zip(*TOKENS, strict=True)
    as_row = lambda values: torch.tensor([values], dtype=torch.float64).float()  # noqa: E731
    return as_row(p).log(), as_row(p_old).log(), as_row(adv), torch.tensor([mask])


def test_hand_computed_statistics():
    log_prob, old, adv, mask = _batch()
    entropy = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0, 5.0]])
    stats = finalize_statistics(maspo_statistics(log_prob, old, adv, mask, entropy=entropy))
    sigma3 = 0.6**-0.3 / 1.03
    sigma4 = 10 * 1.015
    sigma6 = 0.05**-0.3 * 1.03
    expected = {
        "maspo/token_count": 5,
        "maspo/gated_pos_frac": 0.2,
        "maspo/gated_neg_frac": 0.2,
        "maspo/gate_weight_mean_gated": (0.823908 + 0.837579) / 2,
        "maspo/gate_weight_mean": (0.823908 + 0.837579 + 3) / 5,
        "maspo/sigma_mean": (1.60666 + 1.25970 + sigma3 + sigma4 + sigma6) / 5,
        "maspo/sigma_high_frac": 0.2,
        "maspo/abs_log_ratio_mean": (math.log(2) + math.log(4) + math.log(1.5) + 0 + math.log(2.5)) / 5,
        "maspo/ratio_mean": (2 + 0.25 + 1.5 + 1 + 0.4) / 5,
        "maspo/ppo_clip_frac": 0.4,
        "maspo/entropy_mean": 3.0,
        "maspo/p_lt_0.01/token_frac": 0.2,
        "maspo/p_lt_0.01/ratio_mean": 1.0,
        "maspo/p_lt_0.01/gate_weight_mean": 1.0,
        "maspo/p_lt_0.01/gated_frac": 0.0,
        "maspo/p_0.01_0.1/token_frac": 0.2,
        "maspo/p_0.01_0.1/ratio_mean": 0.4,
        "maspo/p_0.01_0.1/gate_weight_mean": 1.0,
        "maspo/p_0.01_0.1/gated_frac": 0.0,
        "maspo/p_0.1_0.5/token_frac": 0.4,
        "maspo/p_0.1_0.5/ratio_mean": 1.125,
        "maspo/p_0.1_0.5/gate_weight_mean": (0.823908 + 0.837579) / 2,
        "maspo/p_0.1_0.5/gated_frac": 1.0,
        "maspo/p_gt_0.5/token_frac": 0.2,
        "maspo/p_gt_0.5/ratio_mean": 1.5,
        "maspo/p_gt_0.5/gate_weight_mean": 1.0,
        "maspo/p_gt_0.5/gated_frac": 0.0,
    }
    assert set(stats) == set(expected)
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=2e-6, abs=1e-7), key


def test_sums_add_up_over_shards_and_hyperparameters_apply():
    gen = torch.Generator().manual_seed(0)
    old = -torch.empty(6, 20).exponential_(0.4, generator=gen)
    log_prob = old + 0.5 * torch.randn(6, 20, generator=gen)
    adv = torch.randn(6, 1, generator=gen).expand(6, 20)
    mask = torch.rand(6, 20, generator=gen) < 0.7
    hyper = dict(alpha=0.5, sigma_base=2.0, beta_pos=0.1, gate_grad="full", dual_clip_c=3.0)
    whole = maspo_statistics(log_prob, old, adv, mask, **hyper)
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in whole.values())
    parts = [maspo_statistics(log_prob[s], old[s], adv[s], mask[s], **hyper) for s in (slice(0, 1), slice(1, 4), slice(4, 6))]
    for key, value in whole.items():
        torch.testing.assert_close(sum(p[key] for p in parts), value, rtol=1e-5, atol=1e-5)
    default = maspo_statistics(log_prob, old, adv, mask)
    assert default["sigma_sum"] != whole["sigma_sum"]


def test_empty_sets_give_nan_and_bad_input_is_named():
    log_prob, old, adv, mask = _batch()
    stats = finalize_statistics(maspo_statistics(log_prob, old, adv, torch.zeros_like(mask)))
    assert stats["maspo/token_count"] == 0 and math.isnan(stats["maspo/gated_pos_frac"])
    with pytest.raises(ValueError, match="unknown hyperparameter 'eps'"):
        maspo_statistics(log_prob, old, adv, mask, eps=0.2)
    with pytest.raises(ValueError, match="entropy has shape"):
        maspo_statistics(log_prob, old, adv, mask, entropy=torch.ones(3))
    with pytest.raises(ValueError, match="missing sums"):
        finalize_statistics({})
