"""Triton kernels for one vocab shard's log-prob/entropy statistics and gradient.

The two steps that touch [T, V/TP] data in vocab_parallel.py, as GPU kernels (the TP combine of
[T]-sized statistics and the autograd Function stay there, shared with the torch path):

    shard_statistics(logits[T, V/TP], local_index[T], inv_temperature, valid_cols) -> local_max[T], stats[3, T]
        over the first valid_cols columns (the rest: Megatron's vocab padding, never read),
        with x = logits * inv_temperature (fp32) and s = x - local_max:
        stats = (sum_v exp(s), sum_v exp(s) * s, s[local_index]).
        ONE read of the logits: one program per row streams the row in BLOCK_V blocks and keeps a
        running max, rescaling the two running sums when the max grows (online softmax).
    shard_gradient(logits, local_index, log_normaliser[T], onehot_weight[T], slope[T], offset[T],
                   inv_temperature, valid_cols) -> grad[T, V/TP] (the logits' dtype)
        grad = onehot_weight * onehot(local_index) + p * (slope * log p + offset), 0 in the padding,
        log p = x - log_normaliser, p = exp(log p). ONE read of the logits, ONE write of grad.

Any float dtype in, fp32 arithmetic inside. Offsets are int64 (T * V/TP can exceed 2^31 elements).
The vocab dim must be contiguous (stride 1); any row stride. The input is never written.
Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Memory-bound streaming: a few block sizes / warp counts, tuned once per (V/TP, row stride, dtype) on
# the GPU (H200, 16k x 152k bf16: forward 8192/8 warps 1.64 ms, backward 2048/4 warps 2.53 ms).
# The interpreter gets one small config (autotuning there would only repeat slow CPU runs).
_STATISTICS_CONFIGS = [triton.Config({"BLOCK_V": 256}, num_warps=1)] if _INTERPRETED else [
    triton.Config({"BLOCK_V": block}, num_warps=warps)
    for block, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16))]
_GRADIENT_CONFIGS = [triton.Config({"BLOCK_V": 256}, num_warps=1)] if _INTERPRETED else [
    triton.Config({"BLOCK_V": block}, num_warps=warps)
    for block, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8))]


@triton.autotune(configs=_STATISTICS_CONFIGS, key=["vocab_local", "row_stride"])
@triton.jit
def _shard_statistics_kernel(logits_ptr, local_index_ptr, local_max_ptr, stats_ptr, rows, vocab_local, valid_cols,
                             row_stride, inv_temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK_V)
    running_max = -1.0e30  # finite: exp(start - m) = 0 without the nan of (-inf) - (-inf)
    sum_exp = 0.0
    sum_exp_shifted = 0.0
    for start in range(0, valid_cols, BLOCK_V):
        idx = start + cols
        x = tl.load(row_ptr + idx, mask=idx < valid_cols, other=float("-inf")).to(tl.float32) * inv_temperature
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        shift = running_max - new_max  # <= 0: rescale what was summed against the old max
        scale = tl.exp(shift)
        shifted = x - new_max
        exp_shifted = tl.exp(shifted)
        # masked lanes (and -inf logits) have exp = 0 and s = -inf: their exp * s is 0, not nan
        weighted = exp_shifted * tl.where(exp_shifted > 0.0, shifted, 0.0)
        sum_exp_shifted = scale * (sum_exp_shifted + shift * sum_exp) + tl.sum(weighted, axis=0)
        sum_exp = scale * sum_exp + tl.sum(exp_shifted, axis=0)
        running_max = new_max
    target = tl.load(local_index_ptr + row)
    target_x = tl.load(row_ptr + target).to(tl.float32) * inv_temperature
    tl.store(local_max_ptr + row, running_max)
    tl.store(stats_ptr + row, sum_exp)
    tl.store(stats_ptr + rows + row, sum_exp_shifted)
    tl.store(stats_ptr + 2 * rows + row, target_x - running_max)


@triton.autotune(configs=_GRADIENT_CONFIGS, key=["vocab_local", "row_stride"])
@triton.jit
def _shard_gradient_kernel(logits_ptr, grad_ptr, local_index_ptr, log_normaliser_ptr, onehot_weight_ptr, slope_ptr,
                           offset_ptr, vocab_local, valid_cols, row_stride, inv_temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = idx < valid_cols
    x = tl.load(logits_ptr + row * row_stride + idx, mask=valid, other=0.0).to(tl.float32) * inv_temperature
    log_p = x - tl.load(log_normaliser_ptr + row)
    prob = tl.exp(log_p)
    grad = prob * (tl.load(slope_ptr + row) * log_p + tl.load(offset_ptr + row))
    grad = tl.where(idx == tl.load(local_index_ptr + row), grad + tl.load(onehot_weight_ptr + row), grad)
    grad = tl.where(valid, grad, 0.0)
    tl.store(grad_ptr + row * vocab_local + idx, grad.to(grad_ptr.dtype.element_ty), mask=idx < vocab_local)


def _check(logits: torch.Tensor, local_index: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logprob_triton: logits must be [T, V/TP] with a contiguous vocab dim, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    if local_index.shape != logits.shape[:1] or local_index.dtype != torch.int64:
        raise ValueError(f"logprob_triton: local_index must be int64 [{logits.shape[0]}], got "
                         f"{local_index.dtype} {tuple(local_index.shape)}")


def shard_statistics(logits: torch.Tensor, local_index: torch.Tensor, inv_temperature: float, valid_cols: int):
    """local_max[T], stats[3, T] (fp32) of this rank's shard; see the module docstring."""
    _check(logits, local_index)
    rows, vocab_local = logits.shape
    local_max = torch.empty(rows, dtype=torch.float32, device=logits.device)
    stats = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
    if rows:
        _shard_statistics_kernel[(rows,)](logits, local_index, local_max, stats, rows, vocab_local, valid_cols,
                                          logits.stride(0), inv_temperature)
    return local_max, stats


def shard_gradient(logits: torch.Tensor, local_index: torch.Tensor, log_normaliser: torch.Tensor,
                   onehot_weight: torch.Tensor, slope: torch.Tensor, offset: torch.Tensor,
                   inv_temperature: float, valid_cols: int) -> torch.Tensor:
    """grad[T, V/TP] in the logits' dtype; per-row fp32 [T] coefficients as in the module docstring."""
    _check(logits, local_index)
    rows, vocab_local = logits.shape
    grad = torch.empty(rows, vocab_local, dtype=logits.dtype, device=logits.device)
    if rows:
        grid = lambda meta: (rows, triton.cdiv(vocab_local, meta["BLOCK_V"]))  # noqa: E731
        _shard_gradient_kernel[grid](logits, grad, local_index, log_normaliser, onehot_weight, slope, offset,
                                     vocab_local, valid_cols, logits.stride(0), inv_temperature)
    return grad
