"""Algorithm config: which policy loss, its hyperparameters, advantages and aggregation.

The choices come from the registries in algorithms/ (losses, aggregation modes, advantage
estimators, KL estimators), never from a list typed here. Each loss's hyperparameters live in
their own section, `algorithm.<loss>` (so `algorithm.maspo.alpha=0.5` reads naturally on the
command line), and that section IS the dataclass the loss declares beside its code
(algorithms/losses/*): defaults, ranges and help are written once, there.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from maspo_megatron.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATION_MODES,
    KL_ESTIMATORS,
    LOSS_SPECS,
    loss_hyperparameters,
    loss_names,
)
from maspo_megatron.config.fields import option


@dataclasses.dataclass
class RolloutCorrectionConfig:
    """Trainer (pi_old) vs engine (pi_rollout) corrections; verl's semantics (docs/algorithms.md)."""

    is_level: Optional[Literal["token", "sequence"]] = option(
        None, help="IS weights min(pi_old/pi_rollout, is_threshold) on the per-token loss (detached)")
    is_threshold: float = option(2.0, gt=0, help="upper truncation of the IS weights")
    rs_level: Optional[Literal["token", "sequence", "geometric"]] = option(
        None, help="rejection: drop tokens / samples whose ratio is outside [rs_lower, rs_upper]")
    rs_upper: float = option(2.0, gt=0)
    rs_lower: Optional[float] = option(None, gt=0, help="default 1 / rs_upper")
    advantage_tis_cap: Optional[float] = option(
        None, gt=0, help="legacy form: scale the ADVANTAGE by min(pi_old/pi_rollout, cap) before the loss")

    @property
    def rejection_lower(self) -> float:
        return self.rs_lower if self.rs_lower is not None else 1.0 / self.rs_upper

    @property
    def enabled(self) -> bool:
        return self.is_level is not None or self.rs_level is not None or self.advantage_tis_cap is not None

    def validate(self) -> None:
        if self.rs_level is not None and self.rejection_lower > self.rs_upper:
            raise ValueError(f"rs_lower: {self.rejection_lower} must be <= rs_upper ({self.rs_upper})")
        if self.is_level is not None and self.advantage_tis_cap is not None:
            raise ValueError("advantage_tis_cap: would correct the engine mismatch a second time on top of "
                             "is_level; choose one")


@dataclasses.dataclass
class OverlongConfig:
    enabled: bool = False
    buffer_tokens: int = option(64, ge=1, help="soft-penalty zone before max_new_tokens")
    penalty: float = option(1.0, ge=0, help="reward subtracted at the hard limit (linear inside the buffer)")


@dataclasses.dataclass
class AlgorithmOptions:
    """The loss-independent part of `algorithm`; AlgorithmConfig adds one section per registered loss."""

    loss: str = option("maspo", choices=loss_names, help="policy loss, by registry name")
    aggregation: str = option("token-mean", choices=AGGREGATION_MODES,
                              help="token-mean-microbatch: the official MASPO normaliser (layout-dependent)")
    norm_length: Optional[int] = option(None, ge=1, help="constant length for seq-mean-token-sum-norm (default: rollout.max_new_tokens)")
    advantage: str = option("grpo", choices=ADVANTAGE_ESTIMATORS, help="group advantage estimator")
    advantage_eps: float = option(1e-6, gt=0)
    overlong: OverlongConfig = option(factory=OverlongConfig)
    ppo_epochs: int = option(1, ge=1)
    mini_batches: int = option(4, ge=1, help="optimizer steps per rollout batch (4: the official MASPO example); "
                                             ">1 (or ppo_epochs>1) lets the gate act")
    old_logprob_source: Literal["trainer", "engine"] = "trainer"
    tis_cap: Optional[float] = option(None, gt=0, help="removed: see rollout_correction (is_level / advantage_tis_cap)")
    rollout_correction: RolloutCorrectionConfig = option(factory=RolloutCorrectionConfig)
    kl_coef: float = option(0.0, ge=0, help="weight of the KL penalty to the reference policy (a loss term)")
    kl_estimator: str = option("low_var_kl", choices=KL_ESTIMATORS, help="per-token KL estimator (verl's names)")
    kl_reference_offload: bool = option(False, help="keep the KL reference's weights in host memory between "
                                                    "reference passes (one host-to-device copy per RL step)")
    entropy_coef: float = option(0.0, ge=0)
    mask_truncated: bool = option(False, help="drop length-truncated responses from the loss (they still count "
                                              "in their group's advantages)")

    def validate(self) -> None:
        if self.tis_cap is not None:
            raise ValueError("tis_cap: removed; use rollout_correction.is_level=token with is_threshold (IS weights "
                             "on the loss) or rollout_correction.advantage_tis_cap (the old advantage scaling)")
        if self.old_logprob_source == "engine" and self.rollout_correction.enabled:
            raise ValueError("rollout_correction: corrects trainer vs engine log-probs, but old_logprob_source=engine "
                             "already uses the engine's as pi_old (it would correct twice); use trainer or turn it off")

    def loss_hyper(self) -> dict:
        """The keyword hyperparameters of the selected loss, as `policy_loss(name, ..., **hyper)` takes them
        (the loss's defaults when it was registered after this class was built and so has no section)."""
        return self.section(self.loss)

    def section(self, loss: str) -> dict:
        """The hyperparameters of section `algorithm.<loss>` as a dict."""
        section = getattr(self, loss, None)
        return dataclasses.asdict(section) if section is not None else loss_hyperparameters(loss)


def with_loss_sections(base: type) -> type:
    """`base` plus one field per registered loss, `<name>: <its hyperparameter dataclass>`."""
    taken = {field.name for field in dataclasses.fields(base)} & set(LOSS_SPECS)
    if taken:
        raise TypeError(f"algorithm: loss names {sorted(taken)} clash with keys of the algorithm section")
    fields = [(name, spec.hyper, option(factory=spec.hyper, help=f"hyperparameters of the {name} loss"))
              for name, spec in sorted(LOSS_SPECS.items())]
    cls = dataclasses.make_dataclass("AlgorithmConfig", fields, bases=(base,))
    cls.__module__ = __name__
    cls.__doc__ = ("`algorithm`: AlgorithmOptions plus `algorithm.<loss>` for every registered loss "
                   f"({', '.join(sorted(LOSS_SPECS))})")
    return cls


AlgorithmConfig = with_loss_sections(AlgorithmOptions)


def ratio_is_one_by_construction(algorithm_cfg: AlgorithmConfig) -> bool:
    """True when every update sees r = pi_theta / pi_old == 1 exactly.

    One mini-batch, one epoch and old log-probs recomputed by the trainer: the single update
    runs at the weights that produced pi_old, so every built-in loss (all are ratio-based: clip,
    gate, or clipped weight) reduces to the plain policy gradient -A per token.
    """
    return (algorithm_cfg.mini_batches == 1 and algorithm_cfg.ppo_epochs == 1
            and algorithm_cfg.old_logprob_source == "trainer")


RATIO_IS_ONE_WARNING = ("algorithm: mini_batches=1, ppo_epochs=1 and old_logprob_source=trainer make r == 1 for "
                        "every token: the {loss} clip/gate never acts (plain policy gradient); the official MASPO "
                        "example uses 4 mini-batches")
