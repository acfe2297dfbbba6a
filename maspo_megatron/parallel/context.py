"""Context parallel: Megatron's zig-zag split of sequences over CP ranks.

A sequence of length L (a multiple of 2*cp) is cut into 2*cp equal chunks; CP rank i keeps
chunks i and 2*cp-1-i (in that order), which balances causal-attention work across ranks.
  - `zigzag_indices(L, cp, rank)`: the positions one rank keeps of ONE sequence / padded row
    (Megatron's `get_batch_on_this_cp_rank`, BSHD).
  - `packed_zigzag_indices(cu_seqlens_padded, cp, rank)`: the same split applied to EACH sample
    of a packed (THD) row separately, in sample order (Transformer Engine's
    `thd_get_partitioned_indices`, used by Megatron's `get_thd_batch_on_this_cp_rank`).
  - `split_for_cp(tensor, indices, seq_dim)`: index_select along the sequence dimension.
Per-token quantities (log-probs, masks, advantages) stay on the CP rank that computed them; the
loss divides by GLOBAL token/sample counts, so the CP pieces sum to the whole (trainer/loss.py).
"""
from __future__ import annotations

import torch


def _check(cp_size: int, cp_rank: int) -> None:
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"context parallel: rank {cp_rank} is not in [0, {cp_size})")


def zigzag_indices(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """LongTensor[seq_len / cp_size]: positions of chunks (cp_rank, 2*cp_size-1-cp_rank)."""
    _check(cp_size, cp_rank)
    if seq_len % (2 * cp_size):
        raise ValueError(f"context parallel: sequence length {seq_len} must be a multiple of 2*cp = {2 * cp_size}")
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    second = torch.arange(second_start, second_start + chunk, device=device)
    return torch.cat([first, second])


def packed_zigzag_indices(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """LongTensor[total / cp_size]: the zig-zag split of every packed sample, concatenated.

    cu_seqlens_padded[N+1]: cumulative sample lengths (each a multiple of 2*cp_size).
    """
    _check(cp_size, cp_rank)
    bounds = [int(v) for v in cu_seqlens_padded.tolist()]
    pieces = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        if (stop - start) % (2 * cp_size):
            raise ValueError(f"context parallel: packed sample [{start}, {stop}) has length {stop - start}, "
                             f"not a multiple of 2*cp = {2 * cp_size}; pad each sample (pad_multiple)")
        pieces.append(start + zigzag_indices(stop - start, cp_size, cp_rank, device=cu_seqlens_padded.device))
    if not pieces:
        return torch.zeros(0, dtype=torch.long, device=cu_seqlens_padded.device)
    return torch.cat(pieces)


def split_for_cp(tensor: torch.Tensor, indices: torch.Tensor, seq_dim: int = 1) -> torch.Tensor:
    """The CP rank's part of `tensor` along `seq_dim` (a new tensor)."""
    return tensor.index_select(seq_dim, indices.to(tensor.device))


def merge_from_cp(parts: list[torch.Tensor], index_parts: list[torch.Tensor], seq_len: int,
                  seq_dim: int = 1) -> torch.Tensor:
    """Inverse of the split: puts each rank's part back at its positions (for tests/tools)."""
    shape = list(parts[0].shape)
    shape[seq_dim] = seq_len
    out = parts[0].new_zeros(shape)
    for part, index in zip(parts, index_parts, strict=True):
        out.index_copy_(seq_dim, index.to(out.device), part)
    return out
