"""Fill a (TP-sharded, PP-stage-local) Megatron GPTModel chunk straight from HF tensors, and
read its parameters back as full HF tensors. Used for `model.init_from_hf` and in tests; the
converters use the same `WeightMap` for checkpoints on disk.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from maspo_megatron.models import layouts
from maspo_megatron.models.weight_map import WeightMap


def stage_layer_offset(model: torch.nn.Module) -> int:
    """Global index of this chunk's first transformer layer (0 when it has none)."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return int(layers[0].layer_number) - 1


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _mapped_params(model: torch.nn.Module, wmap: WeightMap) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The chunk's parameters that the table maps (rotary buffers and extra state are not parameters)."""
    for name, param in _unwrap(model).named_parameters():
        if name == "output_layer.weight" and wmap.meta.tied_embeddings:
            continue  # the last stage's copy of a tied embedding: filled from the embedding below
        yield name, param


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module, wmap: WeightMap, get_hf: Callable[[str], torch.Tensor], tp_rank: int, tp_size: int
) -> None:
    """Copies HF tensors (fetched by name) into this rank's shards of the chunk's parameters."""
    inner = _unwrap(model)
    offset = stage_layer_offset(inner)
    for name, param in _mapped_params(inner, wmap):
        full = wmap.hf_to_megatron(name, get_hf, layer_offset=offset)
        dim, glu = wmap.tp_split(name)
        shard = layouts.shard_tp(full, dim, glu, tp_size, tp_rank)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(f"{name}: shard shape {tuple(shard.shape)} does not match the parameter {tuple(param.shape)}")
        param.copy_(shard)
    tied_output = getattr(inner, "output_layer", None)
    if wmap.meta.tied_embeddings and tied_output is not None and getattr(tied_output, "weight", None) is not None:
        if not getattr(inner, "pre_process", False):
            full = wmap.hf_to_megatron("embedding.word_embeddings.weight", get_hf)
            tied_output.weight.copy_(layouts.shard_tp(full, 0, False, tp_size, tp_rank))


@torch.no_grad()
def export_hf_weights(
    model: torch.nn.Module, wmap: WeightMap, gather: Callable[[torch.Tensor, str], list[torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, full tensor) for every mapped parameter of this chunk.

    gather(shard, name) returns all TP ranks' shards of the parameter (e.g. an all_gather over the
    TP group); fused HF tensors (q/k/v, gate/up) are yielded together, one after the other.
    """
    inner = _unwrap(model)
    offset = stage_layer_offset(inner)
    for name, param in _mapped_params(inner, wmap):
        dim, glu = wmap.tp_split(name)
        full = layouts.gather_tp(gather(param.detach(), name), dim, glu)
        yield from wmap.megatron_to_hf(name, full, layer_offset=offset)
