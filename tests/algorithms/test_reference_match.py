"""policy_loss against the independent float64 reference (tests/helpers/loss_reference.py):
value AND gradient to 1e-5 relative (fp32) on random inputs, for every loss, with the default
and with non-default hyperparameters; the loss defaults equal the config defaults."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from maspo_megatron.algorithms import LOSS_SPECS, POLICY_LOSSES, loss_hyperparameters, policy_loss
from maspo_megatron.config.algorithm import AlgorithmConfig
from tests.algorithms._runtime import runtime_inputs
from tests.helpers import loss_reference as ref

CASES = [
    ("maspo", {}),
    ("maspo", dict(sigma_base=0.5, alpha=0.5, sigma_high=2.0, adv_low=0.5, adv_high=1.5, beta_pos=0.2, beta_neg=0.3)),
    ("maspo", dict(gate_grad="full", sigma_base=0.7, alpha=0.4, beta_pos=0.1, beta_neg=0.1)),
    ("maspo", dict(alpha=0.0, beta_pos=0.0, beta_neg=0.0, dual_clip_c=1.5)),
    ("maspo", dict(gate=False, clip_eps=0.1, dual_clip_c=2.0)),
    ("grpo", {}),
    ("grpo", dict(eps=0.1)),
    ("grpo", dict(dual_clip_c=None)),
    ("clip_higher", {}),
    ("clip_higher", dict(eps_low=0.1, eps_high=0.4, dual_clip_c=1.5)),
    ("dual_clip", {}),
    ("dual_clip", dict(eps=0.1, c=1.5)),
    ("gspo", {}),
    ("gspo", dict(eps_low=0.02, eps_high=0.05)),
    ("sapo", {}),
    ("sapo", dict(tau_pos=2.0, tau_neg=0.5)),
    ("dac", {}),
    ("dac", dict(eps_low=0.05, eps_high=0.4)),
    ("entropy_adv", {}),
    ("entropy_adv", dict(eps=0.1, alpha=1.5, kappa=1.5, dual_clip_c=None)),
    ("bapo", {}),  # the share never reaches 0.5 here: the last bounds
    ("bapo", dict(rho_target=0.31)),  # seed 0 stops half-way along the path, seed 1 at its end
    ("bapo", dict(rho_target=0.25)),  # seed 0 keeps the start bounds, seed 1 stops after a few steps
    ("bapo", dict(rho_target=0.55, low_start=0.7, low_max=0.95, low_step=0.05, high_start=1.1, high_max=2.0,
                  high_step=0.1, dual_clip_c=2.0)),
    ("cispo", {}),
    ("cispo", dict(eps_low=0.2, eps_high=0.1)),
]


def random_batch(seed: int, rows: int = 8, cols: int = 48, spread: float = 0.6):
    """fp32 inputs whose ratios straddle every clip/gate boundary and whose p_old spans all buckets."""
    gen = torch.Generator().manual_seed(seed)
    old_log_prob = -torch.empty(rows, cols).exponential_(0.5, generator=gen)  # mean p_old ~ 1/3, tail to 1e-6
    log_prob = old_log_prob + spread * torch.randn(rows, cols, generator=gen)
    signs = torch.tensor([(-1.0) ** i for i in range(rows)]).unsqueeze(1)  # both signs always present
    advantages = (signs * 2 * torch.randn(rows, 1, generator=gen).abs()).expand(rows, cols).clone()
    advantages[0] = 0.0  # a group with equal rewards
    mask = torch.rand(rows, cols, generator=gen) < 0.8
    mask[1] = False  # an empty row
    weights = torch.rand(rows, cols, generator=gen) + 0.5
    return log_prob, old_log_prob, advantages, mask, weights


def test_every_registered_loss_is_covered_and_defaults_match_config():
    # a loss is tested against the reference here, or in its own module tests/algorithms/test_loss_<name>.py
    # (so that adding a loss is its file plus its test)
    own_tests = {path.stem.removeprefix("test_loss_") for path in Path(__file__).parent.glob("test_loss_*.py")}
    assert {name for name, _ in CASES} | own_tests >= set(POLICY_LOSSES)
    cfg = AlgorithmConfig()
    for name in POLICY_LOSSES:
        # the config section is the loss's own declaration, not a copy of it
        assert type(getattr(cfg, name)) is LOSS_SPECS[name].hyper, name
        assert loss_hyperparameters(name) == dataclasses.asdict(getattr(cfg, name)), name


@pytest.mark.parametrize("name,hyper", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_value_and_gradient(name, hyper, seed):
    if name == "gspo":
        # the sequence ratio averages ~40 log-ratios and the clip range is tiny: shift whole rows by
        # +-3 eps (rows 2, 3, 6, 7 up; 4, 5 down) so both signs of A meet clipped and unclipped rows.
        eps = hyper.get("eps_high", 4e-4)
        log_prob, old_log_prob, advantages, mask, weights = random_batch(seed, spread=eps / 3)
        shift = torch.tensor([3 * eps * (-1) ** (row // 2) for row in range(log_prob.shape[0])])
        log_prob = log_prob + shift.unsqueeze(1)
    else:
        log_prob, old_log_prob, advantages, mask, weights = random_batch(seed)
    log_prob.requires_grad_()
    runtime = runtime_inputs(name, log_prob)
    loss_tok, metrics = policy_loss(name, log_prob, old_log_prob, advantages, mask, **hyper, **runtime)
    (loss_tok * weights).sum().backward()

    expected = ref.reference(
        name, log_prob.detach().double().tolist(), old_log_prob.double().tolist(),
        advantages.double().tolist(), mask.tolist(), **hyper, **{k: v.double().tolist() for k, v in runtime.items()},
    )
    expected_value = torch.tensor([[v for v, _ in row] for row in expected], dtype=torch.float64)
    expected_grad = torch.tensor([[g for _, g in row] for row in expected], dtype=torch.float64) * weights.double()
    assert loss_tok.dtype == torch.float32
    torch.testing.assert_close(loss_tok.double(), expected_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(log_prob.grad.double(), expected_grad, rtol=1e-5, atol=1e-7)
    # the batch must reach the branches that make the losses differ, or the comparison proves little
    if name == "maspo" and hyper.get("gate", True):
        assert metrics["gated_pos"].any() and metrics["gated_neg"].any()
        assert (metrics["gate_weight"][mask] < 0.95).any()
    if name not in ("sapo", "cispo") and (name != "maspo" or not hyper.get("gate", True) or "dual_clip_c" in hyper):
        clipped = metrics["clipped"].bool()
        assert clipped.any() and (mask & ~clipped & (advantages != 0)).any()
        assert (log_prob.grad[clipped] == 0).all()
