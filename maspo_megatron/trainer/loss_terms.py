"""What the policy loss needs beyond log-probs, for one (CP-sharded) packed micro-batch.

- per-sample sums over a sample's WHOLE response (packed rows, CP shards all-reduced);
- the inputs a loss asks for (its LossSpec.inputs, algorithms/registry.py LOSS_INPUTS): the
  whole-sample mean log-ratio, the entropy, the loss's own batch sums (all-reduced over DP x CP,
  so that e.g. BAPO picks the same bounds on every rank);
- the trainer-vs-engine rollout correction (algorithms/rollout_correction.py) from
  `batch.old_log_probs` (pi_old, the trainer's) and `batch.rollout_log_probs` (the engine's);
- the token normalisers left after its rejection (`kept_tokens`, once per mini-batch, before the
  update: rejected tokens leave the token counts, as in verl).
All tensors stay on the logits' device; the only collectives are over the CP group (per-sample
sums) and the DP x CP group (batch sums), each one small all-reduce per micro-batch.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from maspo_megatron.algorithms import loss_spec
from maspo_megatron.algorithms import rollout_correction as rc
from maspo_megatron.algorithms.ratio import clamped_log_ratio
from maspo_megatron.trainer.batch import PackedMicroBatch


def sample_sums(values: torch.Tensor, batch: PackedMicroBatch, cp_group, cp_size: int,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[R, S]: for each token, the sum of values[R, S] over its WHOLE sample (all CP shards), detached;
    over the tokens of `mask` (default: the loss mask)."""
    mask = batch.loss_mask if mask is None else mask
    count = batch.sample_token_count.numel()
    sums = torch.zeros(count, dtype=torch.float64, device=values.device)
    sums.index_add_(0, batch.sample_index[mask], values.detach()[mask].double())
    if cp_size > 1:
        dist.all_reduce(sums, group=cp_group)
    return sums[batch.sample_index].to(values.dtype)


def sample_token_counts(batch: PackedMicroBatch, dtype: torch.dtype,
                        per_sample: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[R, S]: each token's whole-sample response length (1 where masked); `per_sample` [N] replaces the
    lengths (the kept-token counts after rejection, KeptTokens.sample_token_count)."""
    per_sample = batch.sample_token_count if per_sample is None else per_sample
    counts = per_sample.to(device=batch.loss_mask.device, dtype=dtype)[batch.sample_index]
    return torch.where(batch.loss_mask, counts, torch.ones_like(counts)).clamp(min=1)


def micro_batch_token_count(mask: torch.Tensor, cp_group, cp_size: int) -> torch.Tensor:
    """Tokens of mask[R, S] over the whole micro-batch (all CP shards), at least 1: the official
    normaliser's denominator, as a 0-dim fp64 tensor on the mask's device (no host sync)."""
    count = mask.sum(dtype=torch.float64).reshape(1)
    if cp_size > 1:
        dist.all_reduce(count, group=cp_group)
    return count.clamp(min=1).reshape(())


def loss_inputs(loss: str, hyper: dict, log_prob: torch.Tensor, entropy: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, batch: PackedMicroBatch, *, cp_group=None,
                cp_size: int = 1, dp_cp_group=None, kept: Optional[KeptTokens] = None) -> dict:
    """The LOSS_INPUTS (algorithms/registry.py) the registered loss `loss` asks for, by key.

    log_prob, entropy, advantages, mask: [R, S] of this shard (advantages/mask after the rollout correction);
    kept: the kept-token counts when the correction rejects tokens. A sample's mean log-ratio
    (`seq_log_ratio`, GSPO) is taken over its kept tokens, as verl's GSPO loss averages over the
    response mask its rollout correction modified.
    """
    spec = loss_spec(loss)
    extra = {}
    if "seq_log_ratio" in spec.inputs:
        log_ratio = clamped_log_ratio(log_prob.detach(), batch.old_log_probs)
        sums = sample_sums(log_ratio, batch, cp_group, cp_size, mask=mask)
        counts = sample_token_counts(batch, sums.dtype, None if kept is None else kept.sample_token_count)
        extra["seq_log_ratio"] = sums / counts
    if "entropy" in spec.inputs:
        extra["entropy"] = entropy.detach()
    if "batch_sums" in spec.inputs:
        sums = spec.batch_sums(log_prob, batch.old_log_probs, advantages, mask, **hyper)
        if dp_cp_group is not None:
            dist.all_reduce(sums, group=dp_cp_group)
        extra["batch_sums"] = sums
    return extra


@dataclasses.dataclass
class Correction:
    """The rollout correction of one micro-batch: loss mask, advantages, IS weights and SUMS to report."""

    mask: torch.Tensor                     # [R, S] bool: loss_mask minus rejected tokens
    advantages: torch.Tensor               # [R, S]: batch.advantages, or scaled (advantage_tis_cap)
    weights: Optional[torch.Tensor]        # [R, S] detached IS weights on the per-token loss, or None
    sums: dict                             # {metric key: fp64 scalar SUM}


def rollout_correction(batch: PackedMicroBatch, correction_cfg, cp_group, cp_size: int) -> Correction:
    """Applies cfg.algorithm.rollout_correction (None or disabled: the batch unchanged, no metrics)."""
    mask, advantages = batch.loss_mask, batch.advantages
    if correction_cfg is None or not correction_cfg.enabled:
        return Correction(mask, advantages, None, {})
    log_ratio = rc.rollout_log_ratio(batch.old_log_probs, batch.rollout_log_probs, mask)
    sums = {f"mismatch/{key}_sum": value for key, value in rc.mismatch_sums(log_ratio, mask).items()}
    seq = None
    if correction_cfg.is_level == "sequence" or correction_cfg.rs_level in ("sequence", "geometric"):
        seq = sample_sums(log_ratio, batch, cp_group, cp_size)
    weights = None
    if correction_cfg.is_level is not None:
        weights = rc.importance_weights(log_ratio, mask, correction_cfg.is_level, correction_cfg.is_threshold,
                                        seq_log_ratio_sum=seq)
        sums["mismatch/is_weight_sum"] = weights[mask].double().sum()
    if correction_cfg.advantage_tis_cap is not None:
        scale = rc.importance_weights(log_ratio, mask, "token", correction_cfg.advantage_tis_cap)
        advantages = advantages * scale
        sums["mismatch/advantage_tis_weight_sum"] = scale[mask].double().sum()
    if correction_cfg.rs_level is not None:
        counts = sample_token_counts(batch, log_ratio.dtype) if seq is not None else None
        keep = rc.rejection_keep(log_ratio, mask, correction_cfg.rs_level, correction_cfg.rejection_lower,
                                 correction_cfg.rs_upper, seq_log_ratio_sum=seq, seq_token_count=counts)
        sums["mismatch/rejected_frac_sum"] = (mask & ~keep).double().sum()
        mask = keep
    return Correction(mask, advantages, weights, sums)


def rejects(correction_cfg) -> bool:
    """Whether cfg.algorithm.rollout_correction drops tokens from the loss (rs_level set)."""
    return correction_cfg is not None and correction_cfg.rs_level is not None


@dataclasses.dataclass(frozen=True)
class KeptTokens:
    """The token normalisers of one mini-batch (all micro-batches, all DP x CP ranks) after rejection.

    Rejected tokens leave the token counts, as in verl: `compute_rollout_correction_and_add_to_batch`
    (verl/trainer/ppo/rollout_corr_helper.py) overwrites `response_mask` with the rejected tokens
    zeroed, and `agg_loss` (verl/trainer/ppo/core_algos.py) divides by that mask's global sum
    (token-mean) and each sample's kept tokens (seq-mean-token-mean). Sample counts are unchanged.
    """

    token_count: torch.Tensor         # 0-dim fp64: kept response tokens of the whole mini-batch
    sample_token_count: torch.Tensor  # [N] fp64: kept response tokens of each of its N samples


def kept_tokens(micro_batches: Sequence[PackedMicroBatch], correction_cfg, cp_group=None, cp_size: int = 1,
                dp_cp_group=None) -> Optional[KeptTokens]:
    """Collective (CP per micro-batch, then one DP x CP all-reduce). None without rejection (rs_level unset).

    micro_batches: this rank's (CP-sharded) micro-batches of one mini-batch, old log-probs filled.
    The rejection depends on pi_old and pi_rollout only, so it is fixed for the whole update.
    """
    if not rejects(correction_cfg):
        return None
    if not micro_batches:
        raise ValueError("kept_tokens: a mini-batch without micro-batches (the packer pads every rank)")
    first = micro_batches[0]
    per_sample = torch.zeros(first.sample_token_count.numel(), dtype=torch.float64, device=first.loss_mask.device)
    for batch in micro_batches:
        keep = rollout_correction(batch, correction_cfg, cp_group, cp_size).mask
        # sample_index is 0 where masked, where keep is False: those add nothing
        per_sample.index_add_(0, batch.sample_index.reshape(-1).long(), keep.reshape(-1).to(torch.float64))
    if dp_cp_group is not None:
        dist.all_reduce(per_sample, group=dp_cp_group)
    return KeptTokens(per_sample.sum(), per_sample)
