"""Algorithm config: which policy loss, its hyperparameters, advantages and aggregation.

Defaults follow ../shared/MASPO.md (the official MASPO code). Each loss's hyperparameters live in
their own section so that `algorithm.maspo.alpha=0.5` reads naturally on the command line.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from maspo_megatron.config.fields import option


@dataclasses.dataclass
class MaspoConfig:
    sigma_base: float = option(1.0, gt=0, help="base trust-region width of the Gaussian gate")
    alpha: float = option(0.3, ge=0, help="mass-adaptive exponent: sigma = sigma_base / p_old^alpha; 0 turns it off")
    sigma_high: float = option(10.0, gt=0, help="upper clamp of the mass-adaptive sigma")
    adv_low: float = option(0.1, gt=0, help="lower clamp of the asymmetric risk factor")
    adv_high: float = option(10.0, gt=0, help="upper clamp of the asymmetric risk factor")
    beta_pos: float = option(0.03, ge=0, help="widening of the region for positive advantages")
    beta_neg: float = option(0.03, ge=0, help="narrowing of the region for negative advantages")
    gate_grad: Literal["detached", "full"] = option("detached", help="gradient through the gate weight or not")
    gate: bool = option(True, help="false: hard PPO clip instead of the soft gate (ablation)")
    clip_eps: float = option(0.2, gt=0, help="clip epsilon used when gate=false")
    dual_clip_c: Optional[float] = option(None, gt=1, help="optional bound of the loss for A<0 and r>1 (off by default)")

    def validate(self) -> None:
        if self.sigma_high < self.sigma_base:
            raise ValueError(f"sigma_high: {self.sigma_high} must be >= sigma_base ({self.sigma_base})")
        if self.adv_high < self.adv_low:
            raise ValueError(f"adv_high: {self.adv_high} must be >= adv_low ({self.adv_low})")


_DUAL_CLIP_HELP = "cap -A c on the loss of A<0 tokens (verl's GRPO always applies c=3); null turns it off"


@dataclasses.dataclass
class GrpoConfig:
    eps: float = option(0.2, gt=0, lt=1)
    dual_clip_c: Optional[float] = option(3.0, gt=1, help=_DUAL_CLIP_HELP)


@dataclasses.dataclass
class ClipHigherConfig:
    eps_low: float = option(0.2, gt=0, lt=1)
    eps_high: float = option(0.28, gt=0)
    dual_clip_c: Optional[float] = option(3.0, gt=1, help=_DUAL_CLIP_HELP)


@dataclasses.dataclass
class DualClipConfig:
    eps: float = option(0.2, gt=0, lt=1)
    c: float = option(3.0, gt=1)


@dataclasses.dataclass
class GspoConfig:
    eps_low: float = option(3e-4, gt=0, lt=1)
    eps_high: float = option(4e-4, gt=0)


@dataclasses.dataclass
class SapoConfig:
    tau_pos: float = option(1.0, gt=0)
    tau_neg: float = option(1.05, gt=0)


@dataclasses.dataclass
class DacConfig:
    eps_low: float = option(0.16, gt=0, lt=1)
    eps_high: float = option(0.2, gt=0)


@dataclasses.dataclass
class EntropyAdvConfig:
    eps: float = option(0.2, gt=0, lt=1)
    dual_clip_c: Optional[float] = option(3.0, gt=1, help=_DUAL_CLIP_HELP)
    alpha: float = option(0.4, ge=0, help="entropy bonus scale: A + min(alpha * H, |A| / kappa)")
    kappa: float = option(2.0, gt=1, help="the bonus never exceeds |A| / kappa")


@dataclasses.dataclass
class BapoConfig:
    rho_target: float = option(0.5, ge=0, le=1, help="wanted share of the loss carried by A>0 tokens (the paper: 0.5)")
    low_start: float = option(0.6, gt=0, lt=1)
    low_max: float = option(0.9, gt=0, lt=1)
    low_step: float = option(0.05, ge=0, help="the public recipe's step")
    high_start: float = option(1.2, gt=1)
    high_max: float = option(3.0, gt=1)
    high_step: float = option(0.1, ge=0, help="the public recipe's step")
    dual_clip_c: Optional[float] = option(3.0, gt=1, help=_DUAL_CLIP_HELP)

    def validate(self) -> None:
        if self.low_max < self.low_start:
            raise ValueError(f"low_max: {self.low_max} must be >= low_start ({self.low_start})")
        if self.high_max < self.high_start:
            raise ValueError(f"high_max: {self.high_max} must be >= high_start ({self.high_start})")


@dataclasses.dataclass
class CispoConfig:
    eps_low: float = option(1.0, gt=0, le=1, help="lower bound 1-eps_low of the IS weight (1: no lower bound)")
    eps_high: float = option(0.28, gt=0, help="upper bound 1+eps_high of the IS weight")


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


LOSS_NAMES = ("maspo", "grpo", "clip_higher", "dual_clip", "gspo", "sapo", "dac", "entropy_adv", "bapo", "cispo")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                "token-mean-microbatch")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


@dataclasses.dataclass
class AlgorithmConfig:
    loss: str = option("maspo", choices=LOSS_NAMES, help="policy loss, by registry name")
    aggregation: str = option("token-mean", choices=AGGREGATIONS,
                              help="token-mean-microbatch: the official MASPO normaliser (layout-dependent)")
    norm_length: Optional[int] = option(None, ge=1, help="constant length for seq-mean-token-sum-norm (default: rollout.max_new_tokens)")
    advantage: Literal["grpo", "drgrpo", "rloo"] = "grpo"
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
    maspo: MaspoConfig = option(factory=MaspoConfig)
    grpo: GrpoConfig = option(factory=GrpoConfig)
    clip_higher: ClipHigherConfig = option(factory=ClipHigherConfig)
    dual_clip: DualClipConfig = option(factory=DualClipConfig)
    gspo: GspoConfig = option(factory=GspoConfig)
    sapo: SapoConfig = option(factory=SapoConfig)
    dac: DacConfig = option(factory=DacConfig)
    entropy_adv: EntropyAdvConfig = option(factory=EntropyAdvConfig)
    bapo: BapoConfig = option(factory=BapoConfig)
    cispo: CispoConfig = option(factory=CispoConfig)

    def validate(self) -> None:
        if self.tis_cap is not None:
            raise ValueError("tis_cap: removed; use rollout_correction.is_level=token with is_threshold (IS weights "
                             "on the loss) or rollout_correction.advantage_tis_cap (the old advantage scaling)")
        if self.old_logprob_source == "engine" and self.rollout_correction.enabled:
            raise ValueError("rollout_correction: corrects trainer vs engine log-probs, but old_logprob_source=engine "
                             "already uses the engine's as pi_old (it would correct twice); use trainer or turn it off")

    def loss_hyper(self) -> dict:
        """The keyword hyperparameters of the selected loss, as `policy_loss(name, ..., **hyper)` takes them."""
        return dataclasses.asdict(getattr(self, self.loss))


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
