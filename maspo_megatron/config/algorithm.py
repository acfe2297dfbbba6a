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


@dataclasses.dataclass
class GrpoConfig:
    eps: float = option(0.2, gt=0, lt=1)


@dataclasses.dataclass
class ClipHigherConfig:
    eps_low: float = option(0.2, gt=0, lt=1)
    eps_high: float = option(0.28, gt=0)


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
class OverlongConfig:
    enabled: bool = False
    buffer_tokens: int = option(64, ge=1, help="soft-penalty zone before max_new_tokens")
    penalty: float = option(1.0, ge=0, help="reward subtracted at the hard limit (linear inside the buffer)")


LOSS_NAMES = ("maspo", "grpo", "clip_higher", "dual_clip", "gspo", "sapo", "dac")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@dataclasses.dataclass
class AlgorithmConfig:
    loss: str = option("maspo", choices=LOSS_NAMES, help="policy loss, by registry name")
    aggregation: str = option("token-mean", choices=AGGREGATIONS)
    norm_length: Optional[int] = option(None, ge=1, help="constant length for seq-mean-token-sum-norm (default: rollout.max_new_tokens)")
    advantage: Literal["grpo", "drgrpo", "rloo"] = "grpo"
    advantage_eps: float = option(1e-6, gt=0)
    overlong: OverlongConfig = option(factory=OverlongConfig)
    ppo_epochs: int = option(1, ge=1)
    mini_batches: int = option(1, ge=1, help="optimizer steps per rollout batch; >1 (or ppo_epochs>1) lets the gate act")
    old_logprob_source: Literal["trainer", "engine"] = "trainer"
    tis_cap: Optional[float] = option(None, gt=0, help="truncated importance sampling cap on trainer/engine ratio")
    kl_coef: float = option(0.0, ge=0, help="reserved: a KL term needs a reference model (not implemented yet)")
    entropy_coef: float = option(0.0, ge=0)
    maspo: MaspoConfig = option(factory=MaspoConfig)
    grpo: GrpoConfig = option(factory=GrpoConfig)
    clip_higher: ClipHigherConfig = option(factory=ClipHigherConfig)
    dual_clip: DualClipConfig = option(factory=DualClipConfig)
    gspo: GspoConfig = option(factory=GspoConfig)
    sapo: SapoConfig = option(factory=SapoConfig)
    dac: DacConfig = option(factory=DacConfig)

    def validate(self) -> None:
        if self.kl_coef > 0:
            raise ValueError("kl_coef: a KL term needs a reference model, which is not implemented yet; set it to 0")

    def loss_hyper(self) -> dict:
        """The keyword hyperparameters of the selected loss, as `policy_loss(name, ..., **hyper)` takes them."""
        return dataclasses.asdict(getattr(self, self.loss))
