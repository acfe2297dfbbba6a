"""The policy loss handed to Megatron's `get_forward_backward_func`, layout-invariant.

    loss_fn = partial(megatron_loss_func, settings=LossSettings.from_config(cfg.algorithm), dims=dims,
                      num_microbatches=len(micro_batches))
    losses_reduced = run_micro_batches(policy, micro_batches, loss_fn, dims, forward_only=False)  # trainer/forward.py
    metrics = finalize_metrics(reduce_sums(losses_reduced, dims))     # dict on global rank 0

Per micro-batch (on the last pipeline stage): fused vocab-parallel log-probs + entropy ->
rollout correction (trainer vs engine; loss_terms.py; the tokens it rejects also leave the
token counts, `kept`, counted once per mini-batch by loss_terms.kept_tokens) -> `policy_loss` (any registry loss) ->
`aggregate_loss` with the GLOBAL normalisers of the micro-batch (PackedMicroBatch), plus the
entropy bonus and the KL penalty to `batch.ref_log_probs` -> this shard's contribution c, where
the sum of c over every micro-batch and every DP x CP rank is exactly the global-batch loss L
(for `token-mean-microbatch`, the official normaliser, L itself depends on the cut).

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

from maspo_megatron.algorithms import STATISTICS, aggregate_loss, kl_penalty, loss_statistics, policy_loss
from maspo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs_entropy
from maspo_megatron.trainer.batch import PackedMicroBatch
from maspo_megatron.trainer.loss_terms import (
    KeptTokens,
    loss_inputs,
    micro_batch_token_count,
    rejects,
    rollout_correction,
)

# Sums of maspo_statistics over the tokens with A != 0 only: tokens of a group whose rewards are all
# equal (A = 0) can never be clipped or gated, so these say how hard the gate acts where it can act.
ACTIVE_PREFIX = "stats_active"


@dataclasses.dataclass
class LossSettings:
    """What the loss needs from cfg.algorithm (plus the sampling temperature of the rollouts)."""

    loss: str = "maspo"
    hyper: dict = dataclasses.field(default_factory=dict)
    aggregation: str = "token-mean"
    norm_length: Optional[int] = None
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"
    correction: Optional[object] = None  # cfg.algorithm.rollout_correction (RolloutCorrectionConfig)
    temperature: float = 1.0
    statistics: Optional[str] = None  # the statistics the loss reports (its LossSpec), None for none
    statistics_hyper: dict = dataclasses.field(default_factory=dict)  # the section they read
    chunk_size: Optional[int] = None
    vocab_size: Optional[int] = None  # the tokenizer's; logit columns past it are Megatron's padding

    @classmethod
    def from_config(cls, algorithm_cfg, temperature: float = 1.0, vocab_size: Optional[int] = None) -> LossSettings:
        stats = loss_statistics(algorithm_cfg.loss)
        return cls(loss=algorithm_cfg.loss, hyper=algorithm_cfg.loss_hyper(), aggregation=algorithm_cfg.aggregation,
                   norm_length=algorithm_cfg.norm_length, entropy_coef=algorithm_cfg.entropy_coef,
                   kl_coef=algorithm_cfg.kl_coef, kl_estimator=algorithm_cfg.kl_estimator,
                   correction=algorithm_cfg.rollout_correction, temperature=temperature,
                   statistics=stats.name if stats else None,
                   statistics_hyper=algorithm_cfg.section(stats.section) if stats else {},
                   vocab_size=vocab_size)


def compute_loss(logits: torch.Tensor, batch: PackedMicroBatch, settings: LossSettings, tp_group=None,
                 cp_group=None, cp_size: int = 1, *, dp_cp_group=None, micro_batch_count: int = 1,
                 kept: Optional[KeptTokens] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(contribution to the global loss, {metric: SUM}) for one (CP-sharded) micro-batch.

    logits[R, S, V/TP] (this rank's vocab shard). The contribution is NOT rescaled for Megatron
    (see `megatron_loss_func`); it is what a single-process reference sums over micro-batches.
    dp_cp_group: the group whose ranks hold the other parts of this micro-batch's batch (BAPO's
    bound choice); micro_batch_count: micro-batches of the optimizer step over all DP ranks
    (token-mean-microbatch); kept: the mini-batch's token counts after rejection
    (loss_terms.kept_tokens), required when the correction rejects (rs_level set).
    Loss = aggregate(policy loss [x IS weights]) - entropy_coef aggregate(H) + kl_coef aggregate(KL),
    all over the loss mask minus the tokens rejected by the rollout correction, divided by counts of
    the tokens that are left (rejected tokens leave the denominators too, as in verl).
    """
    log_prob, entropy = vocab_parallel_logprobs_entropy(
        logits, batch.target, tp_group, temperature=settings.temperature, chunk_size=settings.chunk_size,
        vocab_size=settings.vocab_size)
    if rejects(settings.correction) and kept is None:
        raise ValueError("compute_loss: algorithm.rollout_correction.rs_level rejects tokens, so the loss needs "
                         "the mini-batch's kept-token counts (kept=loss_terms.kept_tokens(...))")
    corrected = rollout_correction(batch, settings.correction, cp_group, cp_size)
    mask, advantages = corrected.mask, corrected.advantages
    hyper = dict(settings.hyper)
    hyper.update(loss_inputs(settings.loss, settings.hyper, log_prob, entropy, advantages, mask, batch,
                                   cp_group=cp_group, cp_size=cp_size, dp_cp_group=dp_cp_group, kept=kept))
    loss_tok, token_metrics = policy_loss(settings.loss, log_prob, batch.old_log_probs, advantages, mask, **hyper)
    if corrected.weights is not None:
        loss_tok = loss_tok * corrected.weights
    normalisers = dict(global_token_count=max(batch.global_token_count, 1),
                       global_sample_count=max(batch.global_sample_count, 1), sample_index=batch.sample_index,
                       sample_token_count=batch.sample_token_count, norm_length=settings.norm_length,
                       micro_batch_count=micro_batch_count)
    if kept is not None:  # count only the tokens left in the loss
        normalisers.update(global_token_count=kept.token_count.clamp(min=1), sample_token_count=kept.sample_token_count)
    if settings.aggregation == "token-mean-microbatch":
        normalisers["micro_batch_token_count"] = micro_batch_token_count(mask, cp_group, cp_size)
    contribution = aggregate_loss(loss_tok, mask, settings.aggregation, **normalisers)
    full_mask = batch.loss_mask
    sums = dict(corrected.sums)
    if settings.entropy_coef:
        contribution = contribution - settings.entropy_coef * aggregate_loss(
            entropy, mask, settings.aggregation, **normalisers)
    if settings.kl_coef:
        kl_tok = kl_penalty(log_prob, batch.ref_log_probs, settings.kl_estimator)
        contribution = contribution + settings.kl_coef * aggregate_loss(kl_tok, mask, settings.aggregation,
                                                                        **normalisers)
        sums["kl_sum"] = kl_tok.detach()[full_mask].double().sum()
    sums.update({"loss_sum": contribution.detach().double(), "entropy_sum": entropy.detach()[full_mask].double().sum(),
                 "log_prob_sum": log_prob.detach()[full_mask].double().sum(),
                 "response_token_count": full_mask.sum().double()})
    for key, value in token_metrics.items():
        if value.shape == full_mask.shape:
            sums[f"{settings.loss}/{key}_sum"] = value[full_mask].double().sum()
    if settings.statistics is not None:
        spec = STATISTICS[settings.statistics]
        for prefix, where in (("stats", full_mask), (ACTIVE_PREFIX, full_mask & (batch.advantages != 0))):
            statistics = spec.sums(log_prob.detach(), batch.old_log_probs, batch.advantages, where,
                                   **settings.statistics_hyper)
            sums.update({f"{prefix}/{settings.statistics}/{k}": v.double() for k, v in statistics.items()})
    return contribution, sums


def batch_group(dims):
    """The DP x CP group whose ranks hold the parts of one batch, or None when a single rank holds it all."""
    return dims.dp_cp_group if dims.dp * dims.cp > 1 else None


def megatron_loss_func(batch: PackedMicroBatch, output_tensor: torch.Tensor, *, settings: LossSettings, dims,
                       num_microbatches: int, kept: Optional[KeptTokens] = None):
    """Megatron's loss_func(output_tensor) -> (scaled loss, num_tokens, {metric: SUM}); see the module doc.

    num_microbatches: micro-batches of this optimizer step on this rank; kept: see compute_loss.
    The Megatron rescale uses the token counts BEFORE rejection (what `finalize_model_grads` sums),
    whatever the aggregation divided by: it is undone exactly, and never divides by 0.
    """
    contribution, sums = compute_loss(output_tensor, batch, settings, dims.tp_group, dims.cp_group, dims.cp,
                                      dp_cp_group=batch_group(dims),
                                      micro_batch_count=num_microbatches * dims.dp, kept=kept)
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
    if "kl_sum" in sums:
        out["train/kl"] = sums["kl_sum"] / tokens if tokens else math.nan
    for key, value in sums.items():
        if "/" in key and not key.startswith(("stats/", f"{ACTIVE_PREFIX}/")):
            out[f"train/{key.removesuffix('_sum')}_mean"] = value / tokens if tokens else math.nan
    by_prefix: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in sums.items():
        prefix, _, rest = key.partition("/")
        if prefix in ("stats", ACTIVE_PREFIX):
            name, stat_key = rest.split("/", 1)
            by_prefix.setdefault(prefix, {}).setdefault(name, {})[stat_key] = torch.tensor(value)
    for name, stats in by_prefix.get("stats", {}).items():
        out.update(STATISTICS[name].finalize(stats))
    for name, stats in by_prefix.get(ACTIVE_PREFIX, {}).items():  # the same on the A != 0 tokens only
        section = STATISTICS[name].section
        out.update({f"{section}_active/{key.removeprefix(section + '/')}": value
                    for key, value in STATISTICS[name].finalize(stats).items()})
    return out
