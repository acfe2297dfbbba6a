"""The policy loss handed to Megatron's `get_forward_backward_func`, layout-invariant.

    loss_fn = partial(megatron_loss_func, settings=LossSettings.from_config(cfg.algorithm), dims=dims,
                      num_microbatches=len(micro_batches))
    losses_reduced = run_micro_batches(policy, micro_batches, loss_fn, dims, forward_only=False)  # trainer/forward.py
    metrics = finalize_metrics(reduce_sums(losses_reduced, dims))     # dict on global rank 0

Per micro-batch (on the last pipeline stage): fused vocab-parallel log-probs + entropy ->
`policy_loss` (any registry loss) -> `aggregate_loss` with the GLOBAL normalisers of the
micro-batch (PackedMicroBatch) -> this shard's contribution c, where the sum of c over every
micro-batch and every DP x CP rank is exactly the global-batch loss L.

Megatron then rescales, and we undo it so that the final gradient is dL/dtheta. The policy is
built with `calculate_per_token_loss=True` (trainer/setup.py): nothing is divided per
micro-batch, DDP SUMS over DP x CP, and `finalize_model_grads` divides by N = sum of the returned
token counts over micro-batches and DP x CP ranks. We return the local response-token count (so
N = global_token_count) and the loss c * global_token_count.
TP ranks hold replicated outputs and each computes ONE copy of the loss (as Megatron's own
vocab-parallel cross-entropy): no TP factor. Metrics are SUMS (see parallel/metrics.py).
Micro-batches arrive already CP-sharded (PackedMicroBatch.cp_shard) when cp > 1.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist

from maspo_megatron.algorithms import (
    aggregate_loss,
    finalize_statistics,
    loss_hyperparameters,
    maspo_statistics,
    policy_loss,
)
from maspo_megatron.algorithms.ratio import clamped_log_ratio
from maspo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs_entropy
from maspo_megatron.trainer.batch import PackedMicroBatch


@dataclasses.dataclass
class LossSettings:
    """What the loss needs from cfg.algorithm (plus the sampling temperature of the rollouts)."""

    loss: str = "maspo"
    hyper: dict = dataclasses.field(default_factory=dict)
    aggregation: str = "token-mean"
    norm_length: Optional[int] = None
    entropy_coef: float = 0.0
    temperature: float = 1.0
    maspo_stats_hyper: dict = dataclasses.field(default_factory=dict)
    chunk_size: Optional[int] = None

    @classmethod
    def from_config(cls, algorithm_cfg, temperature: float = 1.0) -> LossSettings:
        if algorithm_cfg.kl_coef > 0:
            raise ValueError("algorithm.kl_coef: a KL term needs reference log-probs, which the packed "
                             "micro-batch does not carry yet; set it to 0")
        maspo = dataclasses.asdict(algorithm_cfg.maspo)
        return cls(loss=algorithm_cfg.loss, hyper=algorithm_cfg.loss_hyper(), aggregation=algorithm_cfg.aggregation,
                   norm_length=algorithm_cfg.norm_length, entropy_coef=algorithm_cfg.entropy_coef,
                   temperature=temperature, maspo_stats_hyper=maspo)


def _sequence_log_ratio(log_ratio: torch.Tensor, batch: PackedMicroBatch, cp_group, cp_size: int) -> torch.Tensor:
    """[R, S] per-token mean log-ratio of the token's WHOLE sample (summed over CP shards), detached."""
    count = batch.sample_token_count.numel()
    sums = torch.zeros(count, dtype=torch.float64, device=log_ratio.device)
    sums.index_add_(0, batch.sample_index[batch.loss_mask], log_ratio.detach()[batch.loss_mask].double())
    if cp_size > 1:
        dist.all_reduce(sums, group=cp_group)
    means = sums / batch.sample_token_count.clamp(min=1).to(sums)
    return means[batch.sample_index].to(log_ratio.dtype)


def compute_loss(logits: torch.Tensor, batch: PackedMicroBatch, settings: LossSettings, tp_group=None,
                 cp_group=None, cp_size: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(contribution to the global loss, {metric: SUM}) for one (CP-sharded) micro-batch.

    logits[R, S, V/TP] (this rank's vocab shard). The contribution is NOT rescaled for Megatron
    (see `megatron_loss_func`); it is what a single-process reference sums over micro-batches.
    """
    mask = batch.loss_mask
    log_prob, entropy = vocab_parallel_logprobs_entropy(
        logits, batch.target, tp_group, temperature=settings.temperature, chunk_size=settings.chunk_size)
    hyper = dict(settings.hyper)
    if "seq_log_ratio" in loss_hyperparameters(settings.loss):
        hyper["seq_log_ratio"] = _sequence_log_ratio(
            clamped_log_ratio(log_prob.detach(), batch.old_log_probs), batch, cp_group, cp_size)
    loss_tok, token_metrics = policy_loss(settings.loss, log_prob, batch.old_log_probs, batch.advantages, mask,
                                          **hyper)
    normalisers = dict(global_token_count=max(batch.global_token_count, 1),
                       global_sample_count=max(batch.global_sample_count, 1), sample_index=batch.sample_index,
                       sample_token_count=batch.sample_token_count, norm_length=settings.norm_length)
    contribution = aggregate_loss(loss_tok, mask, settings.aggregation, **normalisers)
    if settings.entropy_coef:
        contribution = contribution - settings.entropy_coef * aggregate_loss(
            entropy, mask, settings.aggregation, **normalisers)
    sums = {"loss_sum": contribution.detach().double(), "entropy_sum": entropy.detach()[mask].double().sum(),
            "log_prob_sum": log_prob.detach()[mask].double().sum(), "response_token_count": mask.sum().double()}
    for key, value in token_metrics.items():
        if value.shape == mask.shape:
            sums[f"{settings.loss}/{key}_sum"] = value[mask].double().sum()
    sums.update({f"stats/{k}": v.double() for k, v in maspo_statistics(
        log_prob.detach(), batch.old_log_probs, batch.advantages, mask, **settings.maspo_stats_hyper).items()})
    return contribution, sums


def megatron_loss_func(batch: PackedMicroBatch, output_tensor: torch.Tensor, *, settings: LossSettings, dims,
                       num_microbatches: int):
    """Megatron's loss_func(output_tensor) -> (scaled loss, num_tokens, {metric: SUM}); see the module doc.

    num_microbatches: micro-batches of this optimizer step on this rank.
    """
    contribution, sums = compute_loss(output_tensor, batch, settings, dims.tp_group, dims.cp_group, dims.cp)
    return contribution * float(max(batch.global_token_count, 1)), batch.local_token_count, sums


def finalize_metrics(sums: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
    """Floats named train/... and maspo/... from reduce_sums' output (None passes through)."""
    if sums is None:
        return None
    tokens = sums.get("response_token_count", 0.0)
    out = {
        "train/loss": sums.get("loss_sum", math.nan),
        "train/entropy": sums["entropy_sum"] / tokens if tokens else math.nan,
        "train/log_prob_mean": sums["log_prob_sum"] / tokens if tokens else math.nan,
        "train/response_tokens": tokens,
    }
    for key, value in sums.items():
        if "/" in key and not key.startswith("stats/"):
            out[f"train/{key.removesuffix('_sum')}_mean"] = value / tokens if tokens else math.nan
    stats = {key.removeprefix("stats/"): torch.tensor(value) for key, value in sums.items() if key.startswith("stats/")}
    if stats:
        out.update(finalize_statistics(stats))
    return out
