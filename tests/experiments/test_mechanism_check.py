"""The mechanism check (tools/mechanism_check.py): its statistics against independent computations,
its preconditions, its pairing, and that it can tell a broken loss from the real one."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from _evidence_stats import (
    MAX_GATED_WEIGHT,
    MIN_CLIP_FRAC,
    MIN_LOW_P_TOKEN_FRAC,
    all_hold,
    ci_verdict,
    paired_difference,
    preconditions,
    t_quantile,
    trapezoid_auc,
)
from _mechanism_bandit import Arm, BanditConfig, make_problem, run_arm
from mechanism_check import analyse, run_all

from maspo_megatron.algorithms import register_policy_loss

# Two-sided 95 % Student-t critical values from printed tables (df: t_0.975).
T_TABLE = {1: 12.7062, 2: 4.3027, 4: 2.7764, 9: 2.2622, 29: 2.0452, 120: 1.9799}


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_t_quantile_matches_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=1e-4)
    assert t_quantile(0.025, df) == pytest.approx(-T_TABLE[df], abs=1e-4)


def test_paired_difference_against_numpy():
    rng = np.random.default_rng(0)
    a = {s: float(v) for s, v in enumerate(rng.normal(0.3, 0.1, 10))}
    b = {s: float(v) for s, v in enumerate(rng.normal(0.25, 0.1, 10))}
    b[99] = 1.0  # a seed only one arm has is not paired
    d = np.array([a[s] - b[s] for s in range(10)], dtype=np.float64)
    half = 2.2621571628 * d.std(ddof=1) / math.sqrt(10)
    out = paired_difference(a, b)
    assert out["n"] == 10
    assert out["mean"] == pytest.approx(d.mean(), abs=1e-12)
    assert out["sd"] == pytest.approx(d.std(ddof=1), abs=1e-12)
    assert out["low"] == pytest.approx(d.mean() - half, abs=1e-9)
    assert out["high"] == pytest.approx(d.mean() + half, abs=1e-9)


def test_paired_difference_edge_cases():
    assert paired_difference({1: 0.5}, {1: 0.2})["n"] == 1
    assert math.isnan(paired_difference({1: 0.5}, {1: 0.2})["half_width"])
    assert paired_difference({1: math.nan, 2: 1.0, 3: 2.0}, {1: 0.0, 2: 0.0, 3: 0.0})["n"] == 2
    assert ci_verdict(paired_difference({1: 1.0, 2: 1.1, 3: 0.9}, {1: 0.0, 2: 0.0, 3: 0.0})) == "higher"
    assert ci_verdict(paired_difference({1: 1.0, 2: -1.0, 3: 0.1}, {1: 0.0, 2: 0.0, 3: 0.0})) == "no resolved difference"


def test_trapezoid_auc_by_hand():
    assert trapezoid_auc([0, 1, 3], [0.0, 1.0, 1.0]) == pytest.approx((0.5 + 2.0) / 3)
    assert math.isnan(trapezoid_auc([0], [1.0]))


def test_preconditions_thresholds():
    good = {"p_lt_0.01": MIN_LOW_P_TOKEN_FRAC, "p_0.01_0.1": 0.2}
    assert all_hold(preconditions(MIN_CLIP_FRAC, MAX_GATED_WEIGHT, good))
    assert not all_hold(preconditions(MIN_CLIP_FRAC - 1e-6, 0.5, good))        # GRPO hardly clips
    assert not all_hold(preconditions(0.2, MAX_GATED_WEIGHT + 1e-6, good))      # the gate hardly acts
    assert not all_hold(preconditions(0.2, 0.5, {"p_lt_0.01": 0.0, "p_0.01_0.1": 0.2}))  # no rare tokens
    assert not all_hold(preconditions(0.2, 0.5, {"p_0.01_0.1": 0.2}))           # bucket missing
    assert not all_hold(preconditions(math.nan, 0.5, good))                      # nothing measured
    assert [c["ok"] for c in preconditions(0.2, 0.99, good)] == [True, False, True, True]


def _reference_pg(log_prob, old_log_prob, advantages, mask):
    """Importance-weighted policy gradient written out by hand: -A exp(logp - old_logp)."""
    return -advantages * torch.exp(log_prob - old_log_prob), {}


def _broken(log_prob, old_log_prob, advantages, mask):
    """A deliberately broken MASPO-like loss: tokens with A < 0 get no gradient."""
    return -advantages.clamp(min=0) * torch.exp(log_prob - old_log_prob), {}


@pytest.fixture
def test_losses():
    """The two hand-written losses in the registry for one test only (other tests list the registry)."""
    from maspo_megatron.algorithms import unregister_policy_loss

    for name, fn in (("test_reference_pg", _reference_pg), ("test_broken_drops_negatives", _broken)):
        register_policy_loss(name, replace=True)(fn)
    yield
    for name in ("test_reference_pg", "test_broken_drops_negatives"):
        unregister_policy_loss(name)


SMALL = dataclasses.replace(BanditConfig(), steps=8)


def test_unclipped_pg_arm_is_plain_policy_gradient(test_losses):
    """MASPO with sigma_base = sigma_high = 1e6 (the 'unclipped PG' arm) follows the hand-written loss."""
    pg = run_arm(SMALL, Arm("pg", "maspo", {"sigma_base": 1e6, "sigma_high": 1e6}), 3, 0.3)
    ref = run_arm(SMALL, Arm("ref", "test_reference_pg"), 3, 0.3)
    np.testing.assert_allclose(pg["curves"]["expected_reward"], ref["curves"]["expected_reward"], rtol=0, atol=1e-9)
    grpo = run_arm(SMALL, Arm("grpo", "grpo"), 3, 0.3)
    assert abs(grpo["curves"]["expected_reward"][-1] - ref["curves"]["expected_reward"][-1]) > 1e-4  # clipping acts


def test_pairing_same_seed_same_start_and_identical_arms_identical():
    theta_a, correct_a = make_problem(SMALL, 5)
    theta_b, correct_b = make_problem(SMALL, 5)
    assert torch.equal(theta_a, theta_b) and torch.equal(correct_a, correct_b)
    assert not torch.equal(theta_a, make_problem(SMALL, 6)[0])
    runs = run_all(SMALL, [Arm("maspo", "maspo"), Arm("grpo", "maspo")], [1, 2, 3], [0.3])
    diff = analyse(runs, [0.3])["paired"]["same_lr"]["maspo - grpo"]["0.3"]["auc"]
    assert diff["n"] == 3 and diff["mean"] == 0.0 and diff["half_width"] == 0.0


def test_broken_loss_is_detected_as_different(test_losses):
    arms = [Arm("grpo", "test_broken_drops_negatives"), Arm("maspo", "maspo")]
    result = analyse(run_all(SMALL, arms, [1, 2, 3, 4, 5, 6], [0.3]), [0.3])
    diff = result["paired"]["same_lr"]["maspo - grpo"]["0.3"]["auc"]
    assert ci_verdict(diff) != "no resolved difference", diff
    # and the real losses' gate statistics are what the preconditions read
    assert result["stats"]["maspo"]["0.3"]["maspo/gate_weight_mean_gated"] < 1.0
