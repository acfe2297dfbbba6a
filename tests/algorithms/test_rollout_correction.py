"""Rollout-mismatch corrections against an independent float64 reference (plain math over lists)."""
from __future__ import annotations

import math

import pytest
import torch

from maspo_megatron.algorithms import rollout_correction as rc


def _batch(seed=0, rows=5, cols=9):
    gen = torch.Generator().manual_seed(seed)
    rollout = -torch.empty(rows, cols).exponential_(0.7, generator=gen)
    old = rollout + 0.3 * torch.randn(rows, cols, generator=gen)
    old[0, 0] = rollout[0, 0] + 30.0  # beyond the +-20 clamp
    mask = torch.rand(rows, cols, generator=gen) < 0.8
    mask[min(2, rows - 1)] = False  # an empty row
    return old, rollout, mask


def _ref_log_ratios(old, rollout, mask):
    """Per row: the clamped float64 log-ratios of the unmasked tokens (by position)."""
    out = []
    for o_row, r_row, m_row in zip(old.double().tolist(), rollout.double().tolist(), mask.tolist(), strict=True):
        out.append([min(max(o - r, -20.0), 20.0) if m else None for o, r, m in zip(o_row, r_row, m_row, strict=True)])
    return out


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_importance_weights(level):
    old, rollout, mask = _batch()
    log_ratio = rc.rollout_log_ratio(old, rollout, mask)
    weights = rc.importance_weights(log_ratio, mask, level, threshold=1.5)
    expected = []
    for row in _ref_log_ratios(old, rollout, mask):
        total = min(max(sum(x for x in row if x is not None), -20.0), 20.0)
        expected.append([0.0 if x is None else min(math.exp(x if level == "token" else total), 1.5) for x in row])
    torch.testing.assert_close(weights.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    assert not weights.requires_grad
    assert (weights[mask] < 1.5).any() and (weights[mask] == 1.5).any()  # both sides of the truncation reached


@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_rejection_with_lower_and_upper_thresholds(level):
    old, rollout, mask = _batch(1)
    log_ratio = rc.rollout_log_ratio(old, rollout, mask)
    lower, upper = {"token": (0.8, 1.3), "sequence": (0.5, 2.0), "geometric": (0.95, 1.05)}[level]
    keep = rc.rejection_keep(log_ratio, mask, level, lower, upper)
    expected = []
    for row in _ref_log_ratios(old, rollout, mask):
        kept = [x for x in row if x is not None]
        seq = sum(kept) if level == "sequence" else (sum(kept) / len(kept) if kept else 0.0)
        expected.append([x is not None and lower <= math.exp(x if level == "token" else seq) <= upper for x in row])
    assert keep.tolist() == expected
    assert (mask & ~keep).any() and keep.any()  # something rejected, something kept


def test_sequence_statistics_from_packed_or_split_samples():
    """With seq_log_ratio_sum given (the whole sample's sum, e.g. all-reduced over CP), a sample cut
    into two shards gets the same weights and decisions as the whole row."""
    old, rollout, mask = _batch(2, rows=1, cols=12)
    mask[:] = True
    log_ratio = rc.rollout_log_ratio(old, rollout, mask)
    whole_w = rc.importance_weights(log_ratio, mask, "sequence", 3.0)
    whole_keep = rc.rejection_keep(log_ratio, mask, "geometric", 0.9, 1.1)
    total = log_ratio.sum(-1, keepdim=True).expand(1, 12)
    count = torch.full((1, 12), 12.0)
    for part in (slice(0, 5), slice(5, 12)):
        w = rc.importance_weights(log_ratio[:, part], mask[:, part], "sequence", 3.0,
                                  seq_log_ratio_sum=total[:, part])
        keep = rc.rejection_keep(log_ratio[:, part], mask[:, part], "geometric", 0.9, 1.1,
                                 seq_log_ratio_sum=total[:, part], seq_token_count=count[:, part])
        torch.testing.assert_close(w, whole_w[:, part])
        assert torch.equal(keep, whole_keep[:, part])


def test_mismatch_sums():
    old, rollout, mask = _batch(3)
    sums = rc.mismatch_sums(rc.rollout_log_ratio(old, rollout, mask), mask)
    xs = [x for row in _ref_log_ratios(old, rollout, mask) for x in row if x is not None]
    assert sums["kl_k1"].item() == pytest.approx(sum(-x for x in xs), rel=1e-5)
    assert sums["kl_k3"].item() == pytest.approx(sum(math.exp(x) - 1 - x for x in xs), rel=1e-5)
    assert sums["abs_log_ratio"].item() == pytest.approx(sum(abs(x) for x in xs), rel=1e-5)
    assert sums["ratio_sq"].item() == pytest.approx(sum(math.exp(2 * x) for x in xs), rel=1e-5)
    zero = rc.mismatch_sums(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    assert zero["kl_k3"].item() == 0 and zero["ratio_sq"].item() == 6


def test_bad_arguments_are_named():
    lr, mask = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="level 'seq' is not one of"):
        rc.importance_weights(lr, mask, "seq", 2.0)
    with pytest.raises(ValueError, match="need 0 < lower <= upper"):
        rc.rejection_keep(lr, mask, "token", 2.0, 1.0)
    with pytest.raises(ValueError, match="seq_log_ratio_sum has shape"):
        rc.importance_weights(lr, mask, "sequence", 2.0, seq_log_ratio_sum=torch.zeros(1, 3))
