"""The Megatron policy as a stream of full HF-named tensors, one stream per pipeline stage.

Every rank of the stage's tensor-parallel group calls `megatron_hf_stream` (the TP gather is a
collective, tp_gather.py); the stage's export source (tp_rank 0 of data-parallel replica 0, cp_rank 0) receives
the full tensors and yields them, every other rank yields nothing. Each chunk exports its own
layers with its global layer offset; padded vocab rows are trimmed and fused tensors split by the
family table (`WeightMap.megatron_to_hf`). All HF tensors of one Megatron tensor (q/k/v, gate/up)
share a group key so the bucketer never separates them.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from maspo_megatron.models.weight_map import WeightMap, stage_layer_offset
from maspo_megatron.models.wrappers import unwrap
from maspo_megatron.rollout.weight_sync.bucketing import HFItem
from maspo_megatron.rollout.weight_sync.tp_gather import TPGatherer


def is_export_source(dims) -> bool:
    """True on the one rank per pipeline stage that receives full tensors (tp 0, dp 0, cp 0)."""
    return dims.tp_rank == 0 and dims.dp_rank == 0 and dims.cp_rank == 0


def takes_part(dims) -> bool:
    """True on the ranks whose TP group gathers (data-parallel replica 0, cp_rank 0)."""
    return dims.dp_rank == 0 and dims.cp_rank == 0


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
    sharded = [p for chunk in chunks for n, p in mapped_parameters(chunk, wmap) if wmap.tp_split(n)[0] is not None]
    with TPGatherer(sharded, dims) as gatherer:
        for chunk in chunks:
            inner = unwrap(chunk)
            offset = stage_layer_offset(inner)
            for name, param in mapped_parameters(inner, wmap):
                full = gatherer.gather_full(param, *wmap.tp_split(name))
                if full is None:
                    continue
                group_key = (dims.pp_rank, offset, name)
                for hf_name, tensor in wmap.megatron_to_hf(name, full, layer_offset=offset):
                    yield hf_name, tensor, group_key
                del full
