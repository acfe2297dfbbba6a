"""The registry and the entry point's argument checking."""
from __future__ import annotations

import pytest
import torch

from maspo_megatron.algorithms import POLICY_LOSSES, policy_loss, register_policy_loss
from maspo_megatron.config.algorithm import LOSS_NAMES, AlgorithmConfig
from tests.algorithms._runtime import runtime_inputs


def _inputs(shape=(2, 3)):
    return torch.zeros(shape), torch.zeros(shape), torch.ones(shape), torch.ones(shape, dtype=torch.bool)


def test_registry_holds_exactly_the_config_names():
    assert set(LOSS_NAMES) <= set(POLICY_LOSSES)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_config_hyperparameters_are_accepted(name):
    cfg = AlgorithmConfig(loss=name)
    inputs = _inputs()
    loss, _ = policy_loss(cfg.loss, *inputs, **cfg.loss_hyper(), **runtime_inputs(name, inputs[0]))
    assert loss.shape == (2, 3)


def test_unknown_name_and_key_are_named():
    with pytest.raises(ValueError, match="unknown loss 'ppo2'"):
        policy_loss("ppo2", *_inputs())
    with pytest.raises(ValueError, match="'grpo': unknown hyperparameter 'eps_high'"):
        policy_loss("grpo", *_inputs(), eps_high=0.3)
    with pytest.raises(ValueError, match="gate_grad"):
        policy_loss("maspo", *_inputs(), gate_grad="partial")
    with pytest.raises(ValueError, match="'maspo': sigma_high=0.5 is out of range"):
        policy_loss("maspo", *_inputs(), sigma_high=0.5)
    with pytest.raises(ValueError, match="dual_clip_c"):
        policy_loss("maspo", *_inputs(), dual_clip_c=0.5)


def test_shape_and_dtype_mismatches_are_named():
    lp, old, adv, mask = _inputs()
    with pytest.raises(ValueError, match="advantages has shape \\(2,\\)"):
        policy_loss("maspo", lp, old, adv[:, 0], mask)
    with pytest.raises(TypeError, match="old_log_prob must be a floating tensor"):
        policy_loss("maspo", lp, old.long(), adv, mask)


def test_register_custom_loss_gets_prepared_inputs():
    seen = {}

    @register_policy_loss("test_pg_only")
    def plain_pg(log_prob, old_log_prob, advantages, mask, *, scale: float = 1.0):
        seen.update(dtype=log_prob.dtype, masked=log_prob[~mask].tolist(), adv_grad=advantages.requires_grad)
        return -scale * advantages * torch.exp(log_prob - old_log_prob), {}

    try:
        lp = torch.tensor([[-1.0, float("nan")]], dtype=torch.bfloat16, requires_grad=True)
        adv = torch.tensor([[2.0, 2.0]], requires_grad=True)
        mask = torch.tensor([[True, False]])
        loss, _ = policy_loss("test_pg_only", lp, lp.detach(), adv, mask, scale=3.0)
        assert loss.tolist() == [[-6.0, 0.0]]
        assert seen == {"dtype": torch.float32, "masked": [0.0], "adv_grad": False}
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("test_pg_only")(plain_pg)
        with pytest.raises(TypeError, match="expected fn"):
            register_policy_loss("test_bad")(lambda log_prob, **kw: None)
    finally:
        POLICY_LOSSES.pop("test_pg_only", None)
