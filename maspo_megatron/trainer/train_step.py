"""The Megatron half of an RL step, on every rank: batch -> old log-probs -> PPO updates.

    samples = broadcast_samples(samples_on_rank0, dims)          # trainer/sample_handoff.py
    mini = pack_mini_batches(samples, cfg, dims, policy.attention_backend)  # [mini][micro], on dims.device
    sums = compute_old_log_probs(policy, mini, cfg, dims)          # in place, + drift metrics
    train_metrics = ppo_update(policy, optimizer, scheduler, mini, cfg, dims)

Every rank packs the same global batch deterministically and keeps its data-parallel share
(balanced by tokens; trainer/batch.py), so only the samples travel (flat tensors, one broadcast).
Each mini-batch is packed on its own: its global normalisers are those of the mini-batch, the
batch one optimizer step sees. Micro-batches move to the device once, here, on every pipeline
stage; every pass runs through the one forward step of trainer/forward.py.
"""
from __future__ import annotations

import math
from functools import partial
from typing import List, Optional

import torch
import torch.distributed as dist

from maspo_megatron.parallel.pipeline import interleaved_micro_batches
from maspo_megatron.trainer.batch import PackedMicroBatch, TrainSample, pack_micro_batches
from maspo_megatron.trainer.forward import THD_BACKENDS, run_micro_batches

# FP8 GEMMs need token counts divisible by 16 (per-tensor recipes) or 128 (block scaling).
_FP8_TOKEN_MULTIPLE = {"delayed": 16, "tensorwise": 16, "blockwise": 128, "mxfp8": 128}
_FP8_SAMPLE_MULTIPLE = 16


def split_mini_batches(samples: List[TrainSample], mini_batches: int) -> List[List[TrainSample]]:
    """Contiguous, near-equal slices (groups stay together when the count divides evenly)."""
    count = min(mini_batches, len(samples))
    bounds = [round(i * len(samples) / count) for i in range(count + 1)]
    return [samples[bounds[i]:bounds[i + 1]] for i in range(count)]


def packing_multiples(cfg, dims, attention_backend: str) -> tuple[int, int]:
    """(row_multiple, sample_multiple) of the packer for this layout and attention backend.

    Rows: a multiple of tp (sequence parallel splits the row over TP), of 2*cp (zig-zag), and
    with FP8 of 16 (128 for blockwise/mxfp8) tokens per GEMM after the SP and CP splits.
    Samples (THD only): a multiple of 2*cp (each sample is zig-zag split on its own) and 16 with FP8.
    """
    row_multiple, sample_multiple = 1, 1
    if cfg.parallel.sequence_parallel:
        row_multiple = dims.tp
    if dims.cp > 1:
        row_multiple = math.lcm(row_multiple, 2 * dims.cp)
    if cfg.model.fp8:
        per_gemm = _FP8_TOKEN_MULTIPLE[cfg.model.fp8]
        row_multiple = math.lcm(row_multiple, per_gemm * dims.cp * (dims.tp if cfg.parallel.sequence_parallel else 1))
    if attention_backend in THD_BACKENDS:
        sample_multiple = math.lcm(2 * dims.cp if dims.cp > 1 else 1, _FP8_SAMPLE_MULTIPLE if cfg.model.fp8 else 1)
    return row_multiple, sample_multiple


def pack_mini_batches(samples: List[TrainSample], cfg, dims, attention_backend: str,
                      mini_batches: Optional[int] = None) -> List[List[PackedMicroBatch]]:
    """This rank's micro-batches per mini-batch (default: algorithm.mini_batches), CP-sharded, on dims.device.

    THD backends get one row per micro-batch with its segment bounds (before the CP split, which
    is then per sample); the dense backend keeps the row-wise split.
    """
    thd = attention_backend in THD_BACKENDS
    row_multiple, sample_multiple = packing_multiples(cfg, dims, attention_backend)
    out = []
    for mini in split_mini_batches(samples, mini_batches or cfg.algorithm.mini_batches):
        pack = partial(pack_micro_batches, mini, row_tokens=cfg.trainer.micro_batch_tokens, rows_per_micro_batch=1,
                       dp_size=dims.dp, row_multiple=row_multiple, sample_multiple=sample_multiple,
                       fixed_row_len=dims.pp > 1)
        per_rank = pack()
        # The interleaved schedule needs a multiple of pp micro-batches: pad with empty ones.
        wanted = interleaved_micro_batches(len(per_rank[0]), dims.pp, dims.vpp)
        if wanted != len(per_rank[0]):
            per_rank = pack(min_micro_batches=wanted)
        local = per_rank[dims.dp_rank]
        if thd:
            local = [mb.with_segment_bounds() for mb in local]
        out.append([mb.cp_shard(dims.cp, dims.cp_rank, per_sample=thd).to(dims.device) for mb in local])
    return out


# ---- old log-probs ------------------------------------------------------------------------------
def _logprob_loss(batch: PackedMicroBatch, logits: torch.Tensor, *, cfg, dims, vocab_size: int):
    """Forward-only 'loss': writes the trainer's log-probs into the batch and measures engine drift.

    On entry batch.old_log_probs hold the ENGINE's log-probs (from the rollout; batch.rollout_log_probs
    keeps them). Afterwards they hold the trainer's (old_logprob_source=trainer) or stay the
    engine's (=engine). Corrections for the mismatch act in the loss (trainer/loss_terms.py).
    """
    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    with torch.no_grad():
        trainer_lp, _ = vocab_parallel_logprobs_entropy(logits, batch.target, dims.tp_group,
                                                        temperature=cfg.rollout.temperature, vocab_size=vocab_size)
    mask = batch.loss_mask
    engine_lp = batch.rollout_log_probs
    diff = (trainer_lp - engine_lp)[mask].double()
    sums = {"drift_abs_sum": diff.abs().sum(), "drift_sum": diff.sum(), "drift_max": diff.abs().max() if diff.numel()
            else torch.zeros((), dtype=torch.float64, device=diff.device), "drift_tokens": mask.sum().double()}
    if cfg.algorithm.old_logprob_source == "trainer":
        batch.old_log_probs[mask] = trainer_lp[mask]
    sums = {k: v.reshape(()) for k, v in sums.items()}
    return torch.zeros((), device=logits.device), batch.local_token_count, sums


def compute_old_log_probs(policy, mini_batches: List[List[PackedMicroBatch]], cfg, dims) -> Optional[dict]:
    """Collective. Fills old log-probs in place (last PP stage); returns drift metrics on rank 0."""
    from maspo_megatron.parallel.metrics import reduce_sums

    loss_fn = partial(_logprob_loss, cfg=cfg, dims=dims, vocab_size=policy.meta.vocab_size)
    reduced = []
    with torch.no_grad():
        for batches in mini_batches:
            reduced.extend(run_micro_batches(policy, batches, loss_fn, dims, forward_only=True))
    # drift_max is a max, not a sum: reduce it apart from the sums (only last stages have values).
    maxima = [r.pop("drift_max").reshape(1) for r in reduced]
    maxima = torch.cat(maxima).max().reshape(1) if maxima else torch.zeros(1, dtype=torch.float64, device=dims.device)
    if dims.world_size > 1:
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    sums = reduce_sums(reduced, dims)
    if sums is None:
        return None
    tokens = max(sums.get("drift_tokens", 0.0), 1.0)
    out = {"rollout/logprob_diff_abs_mean": sums.get("drift_abs_sum", 0.0) / tokens,
           "rollout/logprob_diff_mean": sums.get("drift_sum", 0.0) / tokens,
           "rollout/logprob_diff_abs_max": float(maxima.item())}
    return out


# ---- PPO updates --------------------------------------------------------------------------------
def ppo_update(policy, optimizer, scheduler, mini_batches: List[List[PackedMicroBatch]], cfg, dims) -> Optional[dict]:
    """Collective. ppo_epochs x mini-batches of forward/backward + optimizer step; metrics on rank 0.

    A step whose gradients are not finite anywhere is skipped (no parameter or LR change) and
    counted in train/skipped_steps.
    """
    from maspo_megatron.parallel.metrics import reduce_sums
    from maspo_megatron.trainer.loss import LossSettings, batch_group, finalize_metrics, megatron_loss_func
    from maspo_megatron.trainer.loss_terms import kept_tokens
    from maspo_megatron.trainer.optim import all_grads_finite, current_lr

    settings = LossSettings.from_config(cfg.algorithm, temperature=cfg.rollout.temperature,
                                        vocab_size=policy.meta.vocab_size)
    summed: dict = {}  # reduce_sums outputs added over every optimizer step of this RL step
    updates_with_metrics = 0
    grad_norms: List[float] = []
    skipped = 0
    # Tokens the rollout correction rejects leave the loss's token counts (of each whole mini-batch);
    # the rejection depends on pi_old and pi_rollout only, so the counts hold for every epoch.
    kept = [kept_tokens(batches, settings.correction, dims.cp_group, dims.cp, batch_group(dims))
            for batches in mini_batches]
    for _epoch in range(cfg.algorithm.ppo_epochs):
        for batches, mini_kept in zip(mini_batches, kept, strict=True):
            loss_fn = partial(megatron_loss_func, settings=settings, dims=dims, num_microbatches=len(batches),
                              kept=mini_kept)
            optimizer.zero_grad()
            for chunk in policy.chunks:
                chunk.zero_grad_buffer()
            reduced = run_micro_batches(policy, batches, loss_fn, dims, forward_only=False)
            sums = reduce_sums(reduced, dims)
            if all_grads_finite(policy.chunks):
                _, grad_norm, _ = optimizer.step()
                scheduler.step(1)
                grad_norms.append(float(grad_norm) if grad_norm is not None else math.nan)
            else:
                skipped += 1
                optimizer.zero_grad()
                grad_norms.append(math.nan)
            if sums is not None:
                updates_with_metrics += 1
                for key, value in sums.items():
                    summed[key] = summed.get(key, 0.0) + value
    if dims.rank != 0:
        return None
    # Statistics pooled over the tokens of every optimizer step of this RL step (sums added, then
    # finalised once): a per-update mean of ratios would be undefined on the first, on-policy
    # update, where nothing is gated. The loss is the mean over the optimizer steps.
    out = finalize_metrics(summed) if updates_with_metrics else {}
    if updates_with_metrics:
        out["train/loss"] = summed["loss_sum"] / updates_with_metrics
    finite = [g for g in grad_norms if math.isfinite(g)]
    out["train/grad_norm"] = sum(finite) / len(finite) if finite else math.nan
    out["train/grad_norm_max"] = max(finite) if finite else math.nan
    out["train/skipped_steps"] = skipped
    out["train/optimizer_steps"] = len(grad_norms) - skipped
    out["train/lr"] = current_lr(optimizer)
    return out
