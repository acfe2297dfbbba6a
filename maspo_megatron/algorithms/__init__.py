"""Pure tensor math of the RL objective: policy losses, aggregation, advantages,
statistics, the KL penalty and rollout-mismatch corrections (rollout_correction).

No torch.distributed and no Megatron here: callers reduce the global normalisers and the
statistics sums across ranks (maspo_megatron/parallel) and pass them in.
"""
from maspo_megatron.algorithms import losses  # noqa: F401  (registers the built-in losses)
from maspo_megatron.algorithms.advantages import ADVANTAGE_ESTIMATORS, group_advantages, keep_groups, overlong_penalty
from maspo_megatron.algorithms.aggregation import AGGREGATION_MODES, LAYOUT_DEPENDENT_MODES, aggregate_loss
from maspo_megatron.algorithms.kl import KL_ESTIMATORS, kl_penalty
from maspo_megatron.algorithms.registry import (
    LOSS_INPUTS,
    LOSS_SPECS,
    POLICY_LOSSES,
    STATISTICS,
    loss_hyperparameters,
    loss_names,
    loss_spec,
    loss_statistics,
    policy_loss,
    register_policy_loss,
    unregister_policy_loss,
)
from maspo_megatron.algorithms.statistics import P_OLD_BUCKETS, finalize_statistics, maspo_statistics

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATION_MODES",
    "KL_ESTIMATORS",
    "LAYOUT_DEPENDENT_MODES",
    "LOSS_INPUTS",
    "LOSS_SPECS",
    "P_OLD_BUCKETS",
    "POLICY_LOSSES",
    "STATISTICS",
    "aggregate_loss",
    "finalize_statistics",
    "group_advantages",
    "kl_penalty",
    "keep_groups",
    "loss_hyperparameters",
    "loss_names",
    "loss_spec",
    "loss_statistics",
    "maspo_statistics",
    "overlong_penalty",
    "policy_loss",
    "register_policy_loss",
    "unregister_policy_loss",
]
