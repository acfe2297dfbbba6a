"""Group advantages, the overlong penalty and the dynamic-sampling predicate on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from maspo_megatron.algorithms import group_advantages, keep_groups, overlong_penalty

# group 0: [1, 0, 0, 0]: mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5; group 1: all equal
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])


def test_grpo():
    adv = group_advantages(REWARDS, 4)
    expected = [0.75 / (0.5 + 1e-6)] + [-0.25 / (0.5 + 1e-6)] * 3 + [0.0] * 4
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    # G = 2: [2, 0] -> mean 1, std sqrt(2); eps is configurable
    adv = group_advantages(torch.tensor([2.0, 0.0]), 2, eps=0.1)
    assert adv.tolist() == pytest.approx([1 / (math.sqrt(2) + 0.1), -1 / (math.sqrt(2) + 0.1)], rel=1e-6)


def test_drgrpo_has_no_std():
    adv = group_advantages(REWARDS, 4, estimator="drgrpo")
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], abs=1e-7)


def test_rloo_leaves_one_out():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 2.0, 6.0]), 4, estimator="rloo")
    # R_i - mean of the other three
    expected = [1.0, -1 / 3, -1 / 3, -1 / 3, 3 - 3.0, 1 - 11 / 3, 2 - 10 / 3, 6 - 2.0]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_bf16_rewards_and_group_order():
    adv = group_advantages(torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.bfloat16), 2, estimator="drgrpo")
    assert adv.dtype == torch.float32 and adv.tolist() == [-0.5, 0.5, 0.5, -0.5]


def test_overlong_penalty():
    lengths = torch.tensor([50, 80, 90, 95, 100, 120])
    pen = overlong_penalty(lengths, max_new_tokens=100, buffer_tokens=20, penalty=1.0)
    assert pen.dtype == torch.float32
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -0.75, -1.0, -1.0])
    assert overlong_penalty(lengths, 100, 20, 0.5).tolist() == pytest.approx([0.0, 0.0, -0.25, -0.375, -0.5, -0.5])


def test_keep_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.25])
    keep = keep_groups(rewards, 4)
    assert keep.dtype == torch.bool and keep.tolist() == [True, False, False, True]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: group_advantages(torch.ones(6), 4), "not a multiple of group_size=4"),
        (lambda: group_advantages(torch.ones(4), 1), "group_size must be >= 2"),
        (lambda: group_advantages(torch.ones(4), 2, estimator="ppo"), "unknown estimator 'ppo'"),
        (lambda: group_advantages(torch.ones(2, 2), 2), "rewards must be 1-D"),
        (lambda: keep_groups(torch.ones(5), 2), "not a multiple"),
        (lambda: overlong_penalty(torch.ones(3), 10, 20, 1.0), "buffer_tokens=20"),
        (lambda: overlong_penalty(torch.ones(3), 10, 5, -1.0), "penalty"),
    ],
)
def test_bad_arguments_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()
