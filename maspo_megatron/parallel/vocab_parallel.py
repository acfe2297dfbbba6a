"""Fused vocab-parallel log-probs and entropy: one custom autograd function.

    log_prob[T], entropy[T] = vocab_parallel_logprobs_entropy(logits[T, V/TP], target[T], tp_group,
                                                              temperature=1.0, chunk_size=None)

With x = logits / temperature over the FULL vocabulary (sharded over TP ranks),
    log_prob[t] = x[t, target[t]] - logsumexp(x[t])
    entropy[t]  = logsumexp(x[t]) - sum_v softmax(x[t])_v * x[t, v]
Forward: two passes over this rank's shard with TWO TP all-reduces in total: MAX of the row max,
then SUM of the stacked [3, T] (sum-exp, sum exp*x, target logit; only the rank owning the
target contributes its logit).
Backward (no collective: each TP rank owns its vocab shard of the gradient), with p = softmax(x):
    d/dx_v = g_lp * (onehot_v - p_v) - g_ent * p_v * (log p_v + entropy)
and 1/temperature on top. The entropy term is skipped when entropy has no gradient.

Memory: the input is never modified. Work is done in row chunks of `chunk_size` rows: every
fp32 temporary is [chunk_size, V/TP]; None picks chunks of about `AUTO_CHUNK_BYTES` per
temporary. Apart from those chunk temporaries and the [T]-sized statistics, the only [T, V/TP]
tensor created is the gradient itself (in the logits' dtype), which backward must return anyway.
Baselines that call log_softmax (+ entropy) hold several [T, V/TP] fp32 copies at once.

The gradient semantics match Megatron's vocab_parallel_cross_entropy: outputs are identical on
all TP ranks, and backward returns, on each rank, its shard of the gradient of ONE copy of a
loss computed from those replicated outputs (do not sum the loss over TP ranks).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

AUTO_CHUNK_BYTES = 64 * 2**20


def _chunk_rows(chunk_size: Optional[int], rows: int, vocab_local: int) -> int:
    if chunk_size is None:
        return max(1, min(rows, AUTO_CHUNK_BYTES // (4 * max(vocab_local, 1))))
    if chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size} must be >= 1 (or None for automatic chunks)")
    return chunk_size


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _group_rank(group) -> int:
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


def _scaled_fp32_copy(chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """A NEW fp32 tensor chunk / temperature (`.float()` alone would alias fp32 input)."""
    scaled = chunk.to(torch.float32, copy=True)
    if temperature != 1.0:
        scaled.div_(temperature)
    return scaled


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, temperature, chunk_rows):
        rows, vocab_local = logits.shape
        vocab_start = _group_rank(tp_group) * vocab_local
        local_index = target - vocab_start
        in_shard = (local_index >= 0) & (local_index < vocab_local)
        local_index = torch.where(in_shard, local_index, torch.zeros_like(local_index))

        # Pass 1: row max of x = logits / temperature (temperature > 0 keeps the argmax).
        row_max = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            row_max[start:stop] = logits[start:stop].max(dim=-1).values.float()
        row_max.div_(temperature)
        if _group_size(tp_group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)

        # Pass 2: sum exp(s), sum exp(s) * s and the target's s, with s = x - row_max.
        stats = torch.zeros(3, rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            shifted = _scaled_fp32_copy(logits[start:stop], temperature)
            shifted.sub_(row_max[start:stop, None])
            stats[2, start:stop] = shifted.gather(1, local_index[start:stop, None]).squeeze(1)
            exp_shifted = shifted.exp()
            stats[0, start:stop] = exp_shifted.sum(dim=-1)
            stats[1, start:stop] = exp_shifted.mul_(shifted).sum(dim=-1)
            del shifted, exp_shifted
        stats[2].mul_(in_shard)
        if _group_size(tp_group) > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)

        sum_exp, sum_exp_shifted, target_shifted = stats
        log_sum_exp = sum_exp.log()
        log_prob = target_shifted - log_sum_exp
        entropy = log_sum_exp - sum_exp_shifted / sum_exp

        ctx.save_for_backward(logits, local_index, in_shard, row_max + log_sum_exp, entropy)
        ctx.temperature = temperature
        ctx.chunk_rows = chunk_rows
        ctx.set_materialize_grads(False)
        return log_prob, entropy

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):
        logits, local_index, in_shard, log_normaliser, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_log_prob is None and grad_entropy is None):
            return None, None, None, None, None
        rows = logits.shape[0]
        temperature, chunk_rows = ctx.temperature, ctx.chunk_rows
        grad_logits = torch.empty_like(logits)
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            # log p = x - (row_max + logsumexp), computed into one chunk temporary.
            log_p = _scaled_fp32_copy(logits[start:stop], temperature)
            log_p.sub_(log_normaliser[start:stop, None])
            prob = log_p.exp()
            # chunk_grad = -p * (g_lp + g_ent * (log p + entropy)), reusing the log_p buffer.
            if grad_entropy is not None:
                g_ent = grad_entropy[start:stop, None].float()
                chunk_grad = log_p.add_(entropy[start:stop, None]).mul_(g_ent)
                if grad_log_prob is not None:
                    chunk_grad.add_(grad_log_prob[start:stop, None].float())
                chunk_grad.mul_(prob).neg_()
            else:
                chunk_grad = prob.mul_(-grad_log_prob[start:stop, None].float())
            if grad_log_prob is not None:
                onehot_grad = grad_log_prob[start:stop].float() * in_shard[start:stop]
                chunk_grad.scatter_add_(1, local_index[start:stop, None], onehot_grad[:, None])
            if temperature != 1.0:
                chunk_grad.div_(temperature)
            grad_logits[start:stop] = chunk_grad
            del log_p, prob, chunk_grad
        return grad_logits, None, None, None, None


def vocab_parallel_logprobs_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                                    temperature: float = 1.0, chunk_size: Optional[int] = None):
    """(log_prob, entropy), fp32, shaped like `target`, from this rank's vocab shard of the logits.

    logits[..., V/TP]: this TP rank's contiguous vocab shard (rank r holds ids [r*V/TP, (r+1)*V/TP)),
    any float dtype, never modified. target[...]: GLOBAL token ids, same leading shape.
    tp_group: the tensor-parallel group (None or size 1: the full vocabulary is local).
    temperature: divides the logits (> 0; the same as the rollout engine's sampling temperature).
    chunk_size: rows processed at once (bounds every fp32 temporary to [chunk_size, V/TP]).
    """
    if temperature <= 0:
        raise ValueError(f"temperature: {temperature} must be > 0")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_logprobs_entropy: logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)} disagree on the leading dims")
    lead_shape = target.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_target = target.reshape(-1).long()
    chunk_rows = _chunk_rows(chunk_size, flat_logits.shape[0], flat_logits.shape[1])
    log_prob, entropy = _VocabParallelLogprobsEntropy.apply(
        flat_logits, flat_target, tp_group, float(temperature), chunk_rows)
    return log_prob.reshape(lead_shape), entropy.reshape(lead_shape)
