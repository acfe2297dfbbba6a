"""Tensor layout transforms between Hugging Face and Megatron-Core (pure torch, no names).

Megatron layouts (full = TP-gathered tensors):
- fused qkv `linear_qkv.weight[G * (Q/G + 2) * D, H]`: for each query group g the rows are
  [q heads of g (Q/G * D rows); k of g (D rows); v of g (D rows)]; HF keeps
  `q_proj[Q*D, H]`, `k_proj[G*D, H]`, `v_proj[G*D, H]` (the same for the 1-D biases).
  TP shards split dim 0 into contiguous groups, so a plain concatenation gathers them.
- fused gate/up `linear_fc1.weight[2F, H]` = cat(gate[F, H], up[F, H]). A TP rank holds
  cat(gate[r], up[r]) (`[2F/TP, H]`), so gathering is "glu": split every shard in halves.
- vocab `word_embeddings.weight[Vp, H]` / `output_layer.weight[Vp, H]` carry `Vp - V` zero rows
  of padding (Vp a multiple of 128 x TP); HF tensors have exactly V rows.
"""
from __future__ import annotations

from typing import Sequence

import torch


def pad_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Smallest multiple of `divisible_by * tp` that is >= vocab_size (Megatron's rule)."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int) -> torch.Tensor:
    """q[Q*D, ...], k[G*D, ...], v[G*D, ...] -> qkv[G * (Q/G + 2) * D, ...] interleaved per group."""
    head_dim = q.shape[0] // num_heads
    heads_per_group = num_heads // num_groups
    rest = tuple(q.shape[1:])
    q = q.reshape(num_groups, heads_per_group * head_dim, *rest)
    k = k.reshape(num_groups, head_dim, *rest)
    v = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(num_groups * (heads_per_group + 2) * head_dim, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `merge_qkv`: qkv[G * (Q/G + 2) * D, ...] -> (q[Q*D, ...], k[G*D, ...], v[G*D, ...])."""
    heads_per_group = num_heads // num_groups
    head_dim = qkv.shape[0] // (num_groups * (heads_per_group + 2))
    rest = tuple(qkv.shape[1:])
    grouped = qkv.reshape(num_groups, (heads_per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(num_heads * head_dim, *rest).contiguous(),
        k.reshape(num_groups * head_dim, *rest).contiguous(),
        v.reshape(num_groups * head_dim, *rest).contiguous(),
    )


def merge_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate[F, H], up[F, H] -> fc1[2F, H]."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1[2F, H] -> (gate[F, H], up[F, H])."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_rows(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """weight[V, H] -> weight[Vp, H] with zero rows appended (no copy when V == Vp)."""
    extra = padded_rows - weight.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad {weight.shape[0]} rows down to {padded_rows}")
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros((extra, *weight.shape[1:]))], dim=0)


def unpad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """weight[Vp, H] -> weight[V, H] (the padding rows dropped)."""
    if weight.shape[0] < rows:
        raise ValueError(f"tensor has {weight.shape[0]} rows, fewer than the vocab size {rows}")
    return weight[:rows].contiguous() if weight.shape[0] != rows else weight


def shard_tp(full: torch.Tensor, dim: int | None, glu: bool, tp_size: int, tp_rank: int) -> torch.Tensor:
    """The TP rank's shard of a full Megatron tensor (what the rank's parameter holds)."""
    if dim is None or tp_size == 1:
        return full
    if glu:
        gate, up = torch.chunk(full, 2, dim=dim)
        return torch.cat([torch.chunk(gate, tp_size, dim=dim)[tp_rank], torch.chunk(up, tp_size, dim=dim)[tp_rank]], dim=dim)
    return torch.chunk(full, tp_size, dim=dim)[tp_rank].contiguous()


def gather_tp(shards: Sequence[torch.Tensor], dim: int | None, glu: bool) -> torch.Tensor:
    """Inverse of `shard_tp`: the full tensor from all TP ranks' shards (in TP-rank order)."""
    if dim is None or len(shards) == 1:
        return shards[0]
    if glu:
        halves = [torch.chunk(s, 2, dim=dim) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(list(shards), dim=dim)


def hf_row_blocks(layout: str, megatron_rows: int, num_heads: int, num_groups: int, head_dim: int,
                  vocab_size: int) -> list[list[tuple[int, int]]]:
    """Which rows (dim 0) of the full Megatron tensor make up each HF tensor, in order.

    One list per HF tensor of the layout (qkv: q, k, v; gate_up: gate, up; else one), each a list
    of (first Megatron row, row count) blocks whose concatenation is that HF tensor. Rows no block
    names are vocab padding (zero). The same blocks as `merge_qkv` / `merge_gate_up` / `pad_rows`,
    as row ranges, so bytes can be moved between files without building tensors.
    """
    if layout == "copy":
        return [[(0, megatron_rows)]]
    if layout == "vocab":
        return [[(0, vocab_size)]]
    if layout == "gate_up":
        half = megatron_rows // 2
        return [[(0, half)], [(half, half)]]
    if layout == "qkv":
        q_rows = (num_heads // num_groups) * head_dim
        stride = q_rows + 2 * head_dim
        return [[(g * stride, q_rows) for g in range(num_groups)],
                [(g * stride + q_rows, head_dim) for g in range(num_groups)],
                [(g * stride + q_rows + head_dim, head_dim) for g in range(num_groups)]]
    raise ValueError(f"no row blocks for layout {layout!r}")
