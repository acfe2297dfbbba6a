"""Output layer + vocab-parallel log-prob/entropy without a [T, V/TP] logits tensor.

    log_prob[T], entropy[T] = fused_output_logprobs_entropy(hidden[T, H], weight[V/TP, H], target[T],
                                                            tp_group, temperature=1.0, vocab_chunk_size=None)

The same quantities as vocab_parallel_logprobs_entropy(hidden @ weight.T, target, ...), computed
over blocks of C vocab columns: each block's logits[T, C] = hidden @ weight[c:c+C].T go through the
same "shard statistics" step (Triton or torch, vocab_parallel.py), the blocks are merged like TP
shards (rescaled to the rows' max over blocks: rescale_statistics), and the TP combine is the one of
vocab_parallel.combine_over_tp. Backward recomputes each block's logits (one more matmul than an
unfused output layer: the price of never holding [T, V/TP]), turns them into the block's logit
gradient with the same "shard gradient" step, and accumulates
    grad_hidden += grad_block @ weight[c:c+C],  grad_weight[c:c+C] = grad_block.T @ hidden.
Peak extra memory: two [T, C] blocks (logits and their gradient) plus fp32 [T, H] and [T] buffers.
The same pattern as the fused linear cross-entropy of Liger-Kernel and verl (their kernels are not
used here).

TP: hidden is this rank's full [T, H] input of the column-parallel output layer; grad_hidden is
this rank's PARTIAL sum (its vocab shard's contribution), as for a ColumnParallelLinear input: the
caller sums it over TP (Megatron's copy_to_tensor_model_parallel_region does, in backward).
No bias (the output layers of the supported families have none).
"""
from __future__ import annotations

from typing import Optional

import torch

from maspo_megatron.parallel.vocab_parallel import (
    LOWEST_LOGIT,
    auto_chunk_rows,
    combine_over_tp,
    gradient_coefficients,
    local_target_index,
    rescale_statistics,
    shard_gradient,
    shard_statistics,
    use_triton_kernel,
    valid_columns,
)

AUTO_BLOCK_BYTES = 512 * 2**20  # per [T, C] fp32-equivalent block: wide enough for efficient matmuls


def _block_columns(vocab_chunk_size: Optional[int], rows: int, vocab_local: int) -> int:
    if vocab_chunk_size is None:
        return max(1, min(vocab_local, AUTO_BLOCK_BYTES // (4 * max(rows, 1))))
    if vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size: {vocab_chunk_size} must be >= 1 (or None for automatic blocks)")
    return vocab_chunk_size


def _block_target(local_index, in_shard, start: int, stop: int):
    """index[T] into the block [start, stop) (0 where not in it) and owner[T] (target in the block)."""
    index = local_index - start
    owner = in_shard & (index >= 0) & (index < stop - start)
    return torch.where(owner, index, torch.zeros_like(index)), owner


class _FusedOutputLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, tp_group, temperature, block_columns, use_triton, vocab_size):
        rows, vocab_local = hidden.shape[0], weight.shape[0]
        valid_cols = valid_columns(vocab_size, tp_group, vocab_local)
        local_index, in_shard = local_target_index(target, tp_group, vocab_local, valid_cols)
        inv_temperature = 1.0 / temperature
        chunk_rows = auto_chunk_rows(None, rows, block_columns)
        # starts with a neutral block (no columns), so that a shard of padding only needs no special case
        block_max = [torch.full((rows,), LOWEST_LOGIT, dtype=torch.float32, device=hidden.device)]
        block_stats = [torch.zeros(3, rows, dtype=torch.float32, device=hidden.device)]
        block_owner = [torch.zeros_like(in_shard)]
        for start in range(0, valid_cols, block_columns):
            stop = min(start + block_columns, valid_cols)
            index, owner = _block_target(local_index, in_shard, start, stop)
            logits = hidden @ weight[start:stop].t()  # [T, C]
            local_max, stats = shard_statistics(logits, index, inv_temperature, chunk_rows, use_triton,
                                                stop - start)
            block_max.append(local_max)
            block_stats.append(stats)
            block_owner.append(owner)
            del logits
        # Merge the blocks as if they were shards: [n_blocks, T] maxes, [n_blocks, 3, T] statistics.
        block_max, block_stats = torch.stack(block_max), torch.stack(block_stats)
        shard_max = block_max.amax(dim=0)
        rescale_statistics(block_max, block_stats, shard_max, torch.stack(block_owner))
        log_prob, entropy, log_normaliser = combine_over_tp(shard_max, block_stats.sum(dim=0), in_shard, tp_group)
        ctx.save_for_backward(hidden, weight, local_index, in_shard, log_normaliser, entropy)
        ctx.settings = (temperature, block_columns, chunk_rows, use_triton, valid_cols)
        ctx.set_materialize_grads(False)
        return log_prob, entropy

    @staticmethod
    def backward(ctx, grad_log_prob, grad_entropy):
        hidden, weight, local_index, in_shard, log_normaliser, entropy = ctx.saved_tensors
        if grad_log_prob is None and grad_entropy is None:
            return (None,) * 8
        temperature, block_columns, chunk_rows, use_triton, valid_cols = ctx.settings
        inv_temperature = 1.0 / temperature
        onehot_weight, slope, offset = gradient_coefficients(grad_log_prob, grad_entropy, entropy, in_shard,
                                                             inv_temperature)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = None
        if ctx.needs_input_grad[1]:  # the padding rows of the weight get 0
            grad_weight = torch.empty_like(weight) if valid_cols == weight.shape[0] else torch.zeros_like(weight)
        for start in range(0, valid_cols, block_columns):
            stop = min(start + block_columns, valid_cols)
            index, owner = _block_target(local_index, in_shard, start, stop)
            logits = hidden @ weight[start:stop].t()
            grad_logits = shard_gradient(logits, index, log_normaliser, onehot_weight * owner, slope, offset,
                                         inv_temperature, chunk_rows, use_triton, stop - start)
            del logits
            if ctx.needs_input_grad[0]:
                grad_hidden.add_(grad_logits @ weight[start:stop])
            if grad_weight is not None:
                torch.matmul(grad_logits.t(), hidden, out=grad_weight[start:stop])
        grad_hidden = grad_hidden.to(hidden.dtype) if ctx.needs_input_grad[0] else None
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_output_logprobs_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, tp_group=None,
                                  temperature: float = 1.0, vocab_chunk_size: Optional[int] = None,
                                  kernel: str = "auto", vocab_size: Optional[int] = None):
    """(log_prob, entropy), fp32, shaped like `target`, of softmax(hidden @ weight.T / temperature).

    hidden[..., H]: the output layer's input (same on every TP rank). weight[V/TP, H]: this rank's
    vocab shard of the output layer (rank r holds ids [r*V/TP, (r+1)*V/TP)), same dtype as hidden.
    target[...]: GLOBAL token ids, hidden's leading shape. vocab_chunk_size: columns per block
    (None: about AUTO_BLOCK_BYTES of fp32 per [T, C] block). kernel, vocab_size: as
    vocab_parallel_logprobs_entropy (the weight's padding rows are never multiplied; their gradient is 0).
    """
    if temperature <= 0:
        raise ValueError(f"temperature: {temperature} must be > 0")
    if vocab_size is not None and vocab_size < 1:
        raise ValueError(f"vocab_size: {vocab_size} must be >= 1 (or None: no padded rows)")
    if hidden.shape[:-1] != target.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"fused_output_logprobs_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} "
                         f"and target {tuple(target.shape)} must be [..., H], [V/TP, H] and [...]")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_output_logprobs_entropy: hidden {hidden.dtype} and weight {weight.dtype} differ")
    lead_shape = target.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    block_columns = _block_columns(vocab_chunk_size, flat_hidden.shape[0], weight.shape[0])
    log_prob, entropy = _FusedOutputLogprobsEntropy.apply(
        flat_hidden, weight, target.reshape(-1).long(), tp_group, float(temperature), block_columns,
        use_triton_kernel(flat_hidden, kernel), vocab_size)
    return log_prob.reshape(lead_shape), entropy.reshape(lead_shape)
