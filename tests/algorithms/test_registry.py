"""The registry, the declarations it holds and the entry point's argument checking."""
from __future__ import annotations

import dataclasses
from typing import Optional

import pytest
import torch

from maspo_megatron.algorithms import (
    LOSS_SPECS,
    POLICY_LOSSES,
    loss_names,
    policy_loss,
    register_policy_loss,
    unregister_policy_loss,
)
from maspo_megatron.algorithms.hyper import option
from maspo_megatron.config.algorithm import AlgorithmConfig, AlgorithmOptions, with_loss_sections
from tests.algorithms._runtime import runtime_inputs

BUILT_IN = ("bapo", "cispo", "clip_higher", "dac", "dual_clip", "entropy_adv", "grpo", "gspo", "maspo", "sapo")


def _inputs(shape=(2, 3)):
    return torch.zeros(shape), torch.zeros(shape), torch.ones(shape), torch.ones(shape, dtype=torch.bool)


def test_every_built_in_loss_is_registered_and_has_its_section():
    assert set(BUILT_IN) <= set(loss_names())
    cfg = AlgorithmConfig()
    for name in BUILT_IN:
        assert dataclasses.is_dataclass(getattr(cfg, name)), name


@pytest.mark.parametrize("name", BUILT_IN)
def test_config_hyperparameters_are_accepted(name):
    cfg = AlgorithmConfig(loss=name)
    inputs = _inputs()
    loss, _ = policy_loss(cfg.loss, *inputs, **cfg.loss_hyper(), **runtime_inputs(name, inputs[0]))
    assert loss.shape == (2, 3)


def test_unknown_name_key_and_out_of_range_values_are_named():
    with pytest.raises(ValueError, match="unknown loss 'ppo2'"):
        policy_loss("ppo2", *_inputs())
    with pytest.raises(ValueError, match="'grpo': unknown hyperparameter 'eps_high'"):
        policy_loss("grpo", *_inputs(), eps_high=0.3)
    with pytest.raises(ValueError, match="'maspo': gate_grad: 'partial' is not one of"):
        policy_loss("maspo", *_inputs(), gate_grad="partial")
    with pytest.raises(ValueError, match="'maspo': sigma_high: 0.5 must be >= sigma_base"):
        policy_loss("maspo", *_inputs(), sigma_high=0.5)
    with pytest.raises(ValueError, match="'maspo': dual_clip_c: 0.5 must be > 1"):
        policy_loss("maspo", *_inputs(), dual_clip_c=0.5)
    with pytest.raises(ValueError, match="'cispo': eps_low: 1.5 must be <= 1"):
        policy_loss("cispo", *_inputs(), eps_low=1.5)
    with pytest.raises(ValueError, match="'grpo': unknown hyperparameter 'entropy'"):
        policy_loss("grpo", *_inputs(), entropy=torch.zeros(2, 3))


def test_shape_and_dtype_mismatches_are_named():
    lp, old, adv, mask = _inputs()
    with pytest.raises(ValueError, match="advantages has shape \\(2,\\)"):
        policy_loss("maspo", lp, old, adv[:, 0], mask)
    with pytest.raises(TypeError, match="old_log_prob must be a floating tensor"):
        policy_loss("maspo", lp, old.long(), adv, mask)


def test_losses_declare_what_they_need_from_the_trainer():
    assert LOSS_SPECS["gspo"].inputs == ("seq_log_ratio",)
    assert LOSS_SPECS["entropy_adv"].inputs == ("entropy",)
    assert LOSS_SPECS["bapo"].inputs == ("batch_sums",) and LOSS_SPECS["bapo"].batch_sums is not None
    assert all(LOSS_SPECS[name].inputs == () for name in ("maspo", "grpo", "cispo"))


@dataclasses.dataclass
class _ScaleHyper:
    scale: float = option(1.0, gt=0, help="multiplies the plain policy gradient")


def test_register_custom_loss_gets_prepared_inputs_and_a_config_section():
    seen = {}

    @register_policy_loss("test_pg_only", _ScaleHyper, statistics=None)
    def plain_pg(log_prob, old_log_prob, advantages, mask, *, scale: float):
        seen.update(dtype=log_prob.dtype, masked=log_prob[~mask].tolist(), adv_grad=advantages.requires_grad)
        return -scale * advantages * torch.exp(log_prob - old_log_prob), {}

    try:
        lp = torch.tensor([[-1.0, float("nan")]], dtype=torch.bfloat16, requires_grad=True)
        adv = torch.tensor([[2.0, 2.0]], requires_grad=True)
        mask = torch.tensor([[True, False]])
        loss, _ = policy_loss("test_pg_only", lp, lp.detach(), adv, mask, scale=3.0)
        assert loss.tolist() == [[-6.0, 0.0]]
        assert seen == {"dtype": torch.float32, "masked": [0.0], "adv_grad": False}
        with pytest.raises(ValueError, match="'test_pg_only': scale: -1.0 must be > 0"):
            policy_loss("test_pg_only", lp, lp.detach(), adv, mask, scale=-1.0)
        # a config class built now carries the section `algorithm.test_pg_only`, validated by the loader
        from maspo_megatron.config import ConfigError, from_dict

        cls = with_loss_sections(AlgorithmOptions)
        cfg = from_dict(cls, {"loss": "test_pg_only", "test_pg_only": {"scale": 2.0}}, "algorithm.")
        assert cfg.loss_hyper() == {"scale": 2.0}
        with pytest.raises(ConfigError, match="^algorithm.test_pg_only.scale: 0.0 must be > 0$"):
            from_dict(cls, {"test_pg_only": {"scale": 0.0}}, "algorithm.")
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("test_pg_only", _ScaleHyper)(plain_pg)
    finally:
        unregister_policy_loss("test_pg_only")
    assert "test_pg_only" not in POLICY_LOSSES and "test_pg_only" not in loss_names()


def test_declarations_are_checked_at_registration():
    def with_defaults(log_prob, old_log_prob, advantages, mask, *, scale: float = 1.0):
        return log_prob, {}

    def missing_field(log_prob, old_log_prob, advantages, mask):
        return log_prob, {}

    def wants_batch_sums(log_prob, old_log_prob, advantages, mask, *, scale: float,
                         batch_sums: Optional[torch.Tensor] = None):
        return log_prob, {}

    with pytest.raises(TypeError, match="take their defaults from _ScaleHyper"):
        register_policy_loss("test_bad", _ScaleHyper)(with_defaults)
    with pytest.raises(TypeError, match="must be the fields of _ScaleHyper"):
        register_policy_loss("test_bad", _ScaleHyper)(missing_field)
    with pytest.raises(TypeError, match="batch_sums input and register_policy_loss"):
        register_policy_loss("test_bad", _ScaleHyper)(wants_batch_sums)
    with pytest.raises(TypeError, match="expected fn"):
        register_policy_loss("test_bad")(lambda log_prob, **kw: None)
    with pytest.raises(ValueError, match="must be an identifier"):
        register_policy_loss("test-bad")
    assert "test_bad" not in LOSS_SPECS
