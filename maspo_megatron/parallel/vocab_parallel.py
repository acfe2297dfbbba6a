"""Fused vocab-parallel log-probs and entropy: one custom autograd function.

    log_prob[T], entropy[T] = vocab_parallel_logprobs_entropy(logits[T, V/TP], target[T], tp_group,
                                                              temperature=1.0, chunk_size=None,
                                                              kernel="auto", vocab_size=None)

With x = logits / temperature over the FULL vocabulary (sharded over TP ranks),
    log_prob[t] = x[t, target[t]] - logsumexp(x[t])
    entropy[t]  = logsumexp(x[t]) - sum_v softmax(x[t])_v * x[t, v]
Forward: ONE sweep over this rank's shard (the "shard statistics" step), computing per row and
relative to the shard's own max m_r: Z_r = sum exp(s), S_r = sum exp(s) * s and the target's s,
with s = x - m_r. The shards are then combined
with TWO TP all-reduces of [T]-sized tensors: MAX of m_r, then SUM of the stacked [3, T]
statistics rescaled to the global max (only the rank owning the target contributes its logit).
Backward (no collective: each TP rank owns its vocab shard of the gradient), with p = softmax(x):
    d/dx_v = g_lp * (onehot_v - p_v) - g_ent * p_v * (log p_v + entropy)
and 1/temperature on top; the entropy term is skipped when entropy has no gradient. Backward
folds the per-row factors into fp32 [T] coefficients and calls the "shard gradient" step.

Two implementations of the two [T, V/TP] steps sit behind the one autograd Function (which owns
the TP combine): Triton kernels (logprob_triton.py; one read of the logits forward, one read and
one gradient write backward), used for CUDA logits when triton imports (or on CPU tensors under
TRITON_INTERPRET=1, for tests), and the torch chunked loops below, used otherwise. Both take
vocab_size: columns of ids >= vocab_size (Megatron's vocab padding) are neither read nor given
gradient. The pieces (shard_statistics, rescale_statistics, combine_over_tp,
gradient_coefficients, shard_gradient) are also used by fused_output.py.

Memory of the torch kernel (the Triton one allocates only [T]-sized statistics besides the gradient):
the input is never modified. Rows are processed in chunks through ONE reused fp32 work
allocation of [chunk_size, V/TP] (rounded up to an even number of rows: the forward keeps s and
exp(s) of half a chunk each; the backward of non-fp32 logits uses a second one); with
fp32 logits the backward writes straight into the gradient, the only [T, V/TP] tensor created,
which backward must return anyway. chunk_size=None picks about AUTO_CHUNK_BYTES (64 MiB) per
allocation: small against [T, V/TP], large enough that the per-op thread-pool synchronisation
of ~10 ops per chunk is amortised (smaller, cache-sized chunks measured 3x slower with 2
threads on a loaded CPU). Baselines that call log_softmax (+ entropy) hold several [T, V/TP]
fp32 tensors at once.

The gradient semantics match Megatron's vocab_parallel_cross_entropy: outputs are identical on
all TP ranks, and backward returns, on each rank, its shard of the gradient of ONE copy of a
loss computed from those replicated outputs (do not sum the loss over TP ranks).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.distributed as dist

KERNELS = ("auto", "torch", "triton")
LOWEST_LOGIT = -1.0e30  # the row max of a shard without real columns: finite, so exp(it - max) = 0, never nan
AUTO_CHUNK_BYTES = 64 * 2**20  # per work allocation: few ops per row (each op is a thread-pool barrier)


def auto_chunk_rows(chunk_size: Optional[int], rows: int, vocab_local: int) -> int:
    """Rows per chunk of the torch kernel: chunk_size, or about AUTO_CHUNK_BYTES of fp32 when None."""
    if chunk_size is None:
        return max(1, min(rows, AUTO_CHUNK_BYTES // (4 * max(vocab_local, 1))))
    if chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size} must be >= 1 (or None for automatic chunks)")
    return chunk_size


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _group_rank(group) -> int:
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


def _torch_shard_statistics(logits, local_index, inv_temperature, chunk_rows):
    """local_max[T], stats[3, T]: the shard statistics (module docstring), in row chunks of torch ops."""
    rows, vocab_local = logits.shape
    local_max = torch.empty(rows, dtype=torch.float32, device=logits.device)
    stats = torch.zeros(3, rows, dtype=torch.float32, device=logits.device)
    # ONE work allocation of ~chunk_rows rows, used as two halves: s and exp(s).
    half = max(1, -(-min(chunk_rows, rows) // 2))
    work = torch.empty(2, half, vocab_local, dtype=torch.float32, device=logits.device)
    for start in range(0, rows, half):
        stop = min(start + half, rows)
        chunk, shifted, exp_shifted = logits[start:stop], work[0, :stop - start], work[1, :stop - start]
        row_max = chunk.amax(dim=-1, keepdim=True).float()
        torch.sub(chunk, row_max, out=shifted)  # promotes bf16/fp16 to fp32
        if inv_temperature != 1.0:
            shifted.mul_(inv_temperature)
        local_max[start:stop] = row_max.squeeze(1) * inv_temperature
        stats[2, start:stop] = shifted.gather(1, local_index[start:stop, None]).squeeze(1)
        torch.exp(shifted, out=exp_shifted)
        stats[0, start:stop] = exp_shifted.sum(dim=-1)
        stats[1, start:stop] = torch.mul(exp_shifted, shifted, out=shifted).sum(dim=-1)
    return local_max, stats


def _torch_shard_gradient(logits, local_index, log_normaliser, onehot_weight, slope, offset, inv_temperature,
                          chunk_rows, valid_cols):
    """grad[T, V/TP] = onehot_weight onehot + p (slope log p + offset), in row chunks of torch ops.

    slope None: the entropy term is skipped (p * offset). The per-row coefficients are fp32 [T].
    Columns from valid_cols on (vocab padding) get 0.
    """
    full_grad = torch.empty_like(logits)
    full_grad[:, valid_cols:] = 0
    logits, grad_logits = logits[:, :valid_cols], full_grad[:, :valid_cols]
    rows, vocab_local = logits.shape
    # log p = (logits - T * log_normaliser) / T; x * (1/T) is exact only for T = 1 but matches forward.
    shifted_normaliser = (log_normaliser / inv_temperature)[:, None]
    fp32_grad = grad_logits.dtype == torch.float32
    n = min(chunk_rows, rows)
    log_p_buf = torch.empty(n, vocab_local, dtype=torch.float32, device=logits.device)
    prob_buf = None if fp32_grad else torch.empty(n, vocab_local, dtype=torch.float32, device=logits.device)
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        log_p = log_p_buf[:stop - start]
        out = grad_logits[start:stop] if fp32_grad else prob_buf[:stop - start]
        torch.sub(logits[start:stop], shifted_normaliser[start:stop], out=log_p)
        if inv_temperature != 1.0:
            log_p.mul_(inv_temperature)
        torch.exp(log_p, out=out)  # p
        if slope is not None:
            torch.addcmul(offset[start:stop, None], log_p, slope[start:stop, None], out=log_p)
            out.mul_(log_p)
        else:
            out.mul_(offset[start:stop, None])
        out.scatter_add_(1, local_index[start:stop, None], onehot_weight[start:stop, None])
        if not fp32_grad:
            grad_logits[start:stop] = out
    return full_grad


def _triton_kernels():
    """The Triton module, or None where triton does not import (CPU-only installs)."""
    try:
        from maspo_megatron.parallel import logprob_triton
    except ImportError:
        return None
    return logprob_triton


def use_triton_kernel(logits: torch.Tensor, kernel: str) -> bool:
    """kernel 'auto': Triton for CUDA logits (or any logits under TRITON_INTERPRET=1) when it imports."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: {kernel!r} must be one of {KERNELS}")
    if kernel == "torch":
        return False
    runnable = logits.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"
    if kernel == "auto":
        return runnable and _triton_kernels() is not None
    if not runnable or _triton_kernels() is None:
        raise ValueError("kernel: 'triton' needs the triton package and CUDA logits (or TRITON_INTERPRET=1 on CPU)")
    return True


def shard_statistics(logits, local_index, inv_temperature: float, chunk_rows: int, use_triton: bool,
                     valid_cols: int):
    """local_max[T], stats[3, T] of one vocab shard: x = logits * inv_temperature, s = x - local_max,
    stats = (sum exp(s), sum exp(s) * s, s[local_index]) over the first valid_cols columns (Triton
    kernel or torch chunked loop). A shard of padding only: max LOWEST_LOGIT, zero sums."""
    if valid_cols == 0:
        rows = logits.shape[0]
        return (torch.full((rows,), LOWEST_LOGIT, dtype=torch.float32, device=logits.device),
                torch.zeros(3, rows, dtype=torch.float32, device=logits.device))
    if use_triton:
        with _on_device(logits):
            return _triton_kernels().shard_statistics(logits, local_index, inv_temperature, valid_cols)
    return _torch_shard_statistics(logits[:, :valid_cols], local_index, inv_temperature, chunk_rows)


def shard_gradient(logits, local_index, log_normaliser, onehot_weight, slope, offset, inv_temperature: float,
                   chunk_rows: int, use_triton: bool, valid_cols: int):
    """grad[T, V/TP] = onehot_weight onehot(local_index) + p (slope log p + offset), in the logits' dtype;
    0 in the columns from valid_cols on."""
    if valid_cols == 0:  # a shard of padding only
        return torch.zeros_like(logits)
    if use_triton:
        slope = torch.zeros_like(offset) if slope is None else slope
        with _on_device(logits):
            return _triton_kernels().shard_gradient(logits, local_index, log_normaliser, onehot_weight, slope,
                                                    offset, inv_temperature, valid_cols)
    return _torch_shard_gradient(logits, local_index, log_normaliser, onehot_weight, slope, offset, inv_temperature,
                                 chunk_rows, valid_cols)


def rescale_statistics(local_max, stats, new_max, owner) -> None:
    """In place: stats[..., 3, T] relative to local_max[..., T] -> relative to new_max (>= local_max).

    Z' = Z e^(m - M), S' = e^(m - M) (S + (m - M) Z); the target's s is shifted by m - M and kept
    only where owner[..., T] (the shard or block that holds the target) is true.
    """
    shift = local_max - new_max
    scale = shift.exp()
    sum_exp, sum_exp_shifted, target_shifted = stats.unbind(-2)
    sum_exp_shifted.add_(shift * sum_exp).mul_(scale)
    sum_exp.mul_(scale)
    target_shifted.add_(shift).mul_(owner)


def combine_over_tp(local_max, stats, in_shard, tp_group):
    """log_prob[T], entropy[T], log_normaliser[T] (logsumexp of x) from every shard's statistics.

    Two all-reduces of [T]-sized data: MAX of the shard maxes, then SUM of the rescaled [3, T].
    stats is consumed (rescaled in place).
    """
    global_max = local_max.clone()
    if _group_size(tp_group) > 1:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    rescale_statistics(local_max, stats, global_max, in_shard)
    if _group_size(tp_group) > 1:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=tp_group)
    sum_exp, sum_exp_shifted, target_shifted = stats
    log_sum_exp = sum_exp.log()
    return target_shifted - log_sum_exp, log_sum_exp - sum_exp_shifted / sum_exp, global_max + log_sum_exp


def gradient_coefficients(grad_log_prob, grad_entropy, entropy, in_shard, inv_temperature: float):
    """fp32 [T] onehot_weight, slope (None without an entropy gradient), offset of the shard gradient.

    d/dx = (1/T) [g_lp onehot - p (g_lp + g_ent (log p + H))] = onehot_weight onehot + p (slope log p + offset).
    """
    g_lp = torch.zeros_like(entropy) if grad_log_prob is None else grad_log_prob.float()
    onehot_weight = g_lp * in_shard * inv_temperature
    if grad_entropy is None:
        return onehot_weight, None, -g_lp * inv_temperature
    g_ent = grad_entropy.float()
    return onehot_weight, -g_ent * inv_temperature, -(g_ent * entropy + g_lp) * inv_temperature


def valid_columns(vocab_size: Optional[int], tp_group, vocab_local: int) -> int:
    """How many of this rank's vocab_local columns are real ids (< vocab_size; None: all)."""
    if vocab_size is None:
        return vocab_local
    return min(max(vocab_size - _group_rank(tp_group) * vocab_local, 0), vocab_local)


def local_target_index(target, tp_group, vocab_local: int, valid_cols: int):
    """local_index[T] (clamped to 0 off-shard) and in_shard[T] of GLOBAL ids in this rank's real columns."""
    local_index = target - _group_rank(tp_group) * vocab_local
    in_shard = (local_index >= 0) & (local_index < valid_cols)
    return torch.where(in_shard, local_index, torch.zeros_like(local_index)), in_shard


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tp_group, temperature, chunk_rows, use_triton, vocab_size):
        valid_cols = valid_columns(vocab_size, tp_group, logits.shape[1])
        local_index, in_shard = local_target_index(target, tp_group, logits.shape[1], valid_cols)
        local_max, stats = shard_statistics(logits, local_index, 1.0 / temperature, chunk_rows, use_triton,
                                            valid_cols)
        log_prob, entropy, log_normaliser = combine_over_tp(local_max, stats, in_shard, tp_group)
        ctx.save_for_backward(logits, local_index, in_shard, log_normaliser, entropy)
        ctx.settings = (temperature, chunk_rows, use_triton, valid_cols)
        ctx.set_materialize_grads(False)
        return log_prob, entropy

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):
        logits, local_index, in_shard, log_normaliser, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_log_prob is None and grad_entropy is None):
            return (None,) * 7
        temperature, chunk_rows, use_triton, valid_cols = ctx.settings
        coefficients = gradient_coefficients(grad_log_prob, grad_entropy, entropy, in_shard, 1.0 / temperature)
        grad_logits = shard_gradient(logits, local_index, log_normaliser, *coefficients, 1.0 / temperature,
                                     chunk_rows, use_triton, valid_cols)
        return grad_logits, None, None, None, None, None, None


def _on_device(tensor: torch.Tensor):
    """Triton launches on the CURRENT CUDA device: make it the tensor's (a no-op context on CPU)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def vocab_parallel_logprobs_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None,
                                    temperature: float = 1.0, chunk_size: Optional[int] = None,
                                    kernel: str = "auto", vocab_size: Optional[int] = None):
    """(log_prob, entropy), fp32, shaped like `target`, from this rank's vocab shard of the logits.

    logits[..., V/TP]: this TP rank's contiguous vocab shard (rank r holds ids [r*V/TP, (r+1)*V/TP)),
    any float dtype, never modified. target[...]: GLOBAL token ids, same leading shape.
    tp_group: the tensor-parallel group (None or size 1: the full vocabulary is local).
    temperature: divides the logits (> 0; the same as the rollout engine's sampling temperature).
    chunk_size: rows processed at once by the torch kernel (bounds its fp32 temporaries to [chunk_size, V/TP]).
    kernel: 'auto' (Triton for CUDA logits when triton imports, else torch), 'torch' or 'triton'.
    vocab_size: the real vocabulary; ids >= vocab_size (Megatron's padding to a multiple of
    128 * TP) are left out of the softmax and get a zero gradient, without a masked copy of the
    logits. None: every column is real.
    """
    if temperature <= 0:
        raise ValueError(f"temperature: {temperature} must be > 0")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size: {vocab_size} must be >= 1 (or None: no padded columns)")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_logprobs_entropy: logits {tuple(logits.shape)} and target "
                         f"{tuple(target.shape)} disagree on the leading dims")
    lead_shape = target.shape
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_target = target.reshape(-1).long()
    chunk_rows = auto_chunk_rows(chunk_size, flat_logits.shape[0], flat_logits.shape[1])
    use_triton = use_triton_kernel(flat_logits, kernel)
    if use_triton and flat_logits.stride(-1) != 1:
        flat_logits = flat_logits.contiguous()  # the kernels stream rows: the vocab dim must be contiguous
    log_prob, entropy = _VocabParallelLogprobsEntropy.apply(
        flat_logits, flat_target, tp_group, float(temperature), chunk_rows, use_triton, vocab_size)
    return log_prob.reshape(lead_shape), entropy.reshape(lead_shape)
