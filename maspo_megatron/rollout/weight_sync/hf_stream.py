"""The Megatron policy as a stream of full HF-named tensors, one stream per pipeline stage.

Every rank of the stage's tensor-parallel group calls `megatron_hf_stream` (the TP gather is a
collective); the stage's export source (tp_rank 0 of data-parallel replica 0, cp_rank 0) receives
the full tensors and yields them, every other rank yields nothing. Each chunk exports its own
layers with its global layer offset; padded vocab rows are trimmed and fused tensors split by the
family table (`WeightMap.megatron_to_hf`). All HF tensors of one Megatron tensor (q/k/v, gate/up)
share a group key so the bucketer never separates them.
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from maspo_megatron.models import layouts
from maspo_megatron.models.hf_loader import stage_layer_offset
from maspo_megatron.models.weight_map import WeightMap
from maspo_megatron.rollout.weight_sync.bucketing import HFItem


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module") and isinstance(chunk.module, torch.nn.Module):
        chunk = chunk.module
    return chunk


def is_export_source(dims) -> bool:
    """True on the one rank per pipeline stage that receives full tensors (tp 0, dp 0, cp 0)."""
    return dims.tp_rank == 0 and dims.dp_rank == 0 and dims.cp_rank == 0


def takes_part(dims) -> bool:
    """True on the ranks whose TP group gathers (data-parallel replica 0, cp_rank 0)."""
    return dims.dp_rank == 0 and dims.cp_rank == 0


def _gather_tp(shard: torch.Tensor, dims) -> list[torch.Tensor]:
    """All TP shards (in TP-rank order) on the TP source rank; [] elsewhere. shard[...] is this rank's piece."""
    shard = shard.detach().contiguous()
    group = dims.tp_group
    source = dist.get_global_rank(group, 0)
    if dims.tp_rank == 0:
        parts = [torch.empty_like(shard) for _ in range(dims.tp)]
        dist.gather(shard, parts, dst=source, group=group)
        return parts
    dist.gather(shard, None, dst=source, group=group)
    return []


def gather_full(param: torch.Tensor, dims, dim: Optional[int], glu: bool) -> Optional[torch.Tensor]:
    """The full (TP-gathered) Megatron tensor on the TP source rank, None on the other TP ranks.

    Shards split along dim 0 (qkv, vocab, column-parallel) are gathered straight into views of the
    full tensor, saving the concatenation copy; other layouts go through `layouts.gather_tp`.
    """
    if dim is None or dims.tp == 1:  # replicated over TP (norms): the source's copy is the tensor
        return param.detach() if dims.tp_rank == 0 else None
    if dim == 0 and not glu:
        shard = param.detach().contiguous()
        group = dims.tp_group
        source = dist.get_global_rank(group, 0)
        if dims.tp_rank != 0:
            dist.gather(shard, None, dst=source, group=group)
            return None
        full = torch.empty((shard.shape[0] * dims.tp, *shard.shape[1:]), dtype=shard.dtype, device=shard.device)
        dist.gather(shard, list(full.chunk(dims.tp, dim=0)), dst=source, group=group)
        return full
    shards = _gather_tp(param, dims)
    return layouts.gather_tp(shards, dim, glu) if shards else None


def mapped_parameters(chunk: torch.nn.Module, wmap: WeightMap) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The chunk's parameters the family table maps, in module order (a tied output layer is skipped:
    the engine ties it to the embedding itself)."""
    for name, param in unwrap(chunk).named_parameters():
        if name == "output_layer.weight" and wmap.meta.tied_embeddings:
            continue
        yield name, param


@torch.no_grad()
def megatron_hf_stream(chunks: Sequence[torch.nn.Module], wmap: WeightMap, dims) -> Iterator[HFItem]:
    """(hf_name, full tensor, group_key) for every mapped parameter of this rank's chunks.

    Yields on the stage's export source only; must be iterated to the end on every rank of the
    stage's TP group (each parameter is one TP gather). Ranks outside replica 0 yield nothing
    without communicating.
    """
    if not takes_part(dims):
        return
    for chunk in chunks:
        inner = unwrap(chunk)
        offset = stage_layer_offset(inner)
        for name, param in mapped_parameters(inner, wmap):
            dim, glu = wmap.tp_split(name)
            full = gather_full(param, dims, dim, glu)
            if full is None:
                continue
            group_key = (dims.pp_rank, offset, name)
            for hf_name, tensor in wmap.megatron_to_hf(name, full, layer_offset=offset):
                yield hf_name, tensor, group_key
            del full
