"""Fill a (TP-sharded, PP-stage-local) Megatron GPTModel chunk straight from HF tensors, and
read its parameters back as full HF tensors. Used for `model.init_from_hf` and in tests; the
converters use the same `WeightMap` for checkpoints on disk.

Given an `HFCheckpointReader`, each TP rank reads ONLY the bytes of its own shard of every split
tensor (like safetensors' `get_slice`, but with plain reads straight into the parameter): the rows
of its query groups from q/k/v (interleaved per group as Megatron's fused qkv wants), its rows of
gate and of up, its rows of the (padded) vocabulary, the columns of the row-parallel o_proj /
down_proj; replicated tensors (norms) are read in full. At TP2 a rank reads about half of the
checkpoint instead of all of it (tests/checkpoint/test_hf_weights.py measures it).
"""
from __future__ import annotations

from typing import Callable, Iterator, Union

import torch

from maspo_megatron.checkpoint.hf_reader import HFCheckpointReader
from maspo_megatron.models import layouts
from maspo_megatron.models.families import Rule
from maspo_megatron.models.weight_map import WeightMap, stage_layer_offset
from maspo_megatron.models.wrappers import unwrap

HFSource = Union[HFCheckpointReader, Callable[[str], torch.Tensor]]


def _mapped_params(model: torch.nn.Module, wmap: WeightMap) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The chunk's parameters that the table maps (rotary buffers and extra state are not parameters)."""
    for name, param in unwrap(model).named_parameters():
        if name == "output_layer.weight" and wmap.meta.tied_embeddings:
            continue  # the last stage's copy of a tied embedding: filled from the embedding below
        yield name, param


def _shard_runs(full_rows: int, glu: bool, tp_size: int, tp_rank: int) -> list[tuple[int, int, int]]:
    """(first row of the full Megatron tensor, rows, first row of the shard) runs that make up this
    rank's dim-0 shard (`layouts.shard_tp`): one run, or the rank's gate rows and its up rows."""
    if not glu:
        rows = full_rows // tp_size
        return [(tp_rank * rows, rows, 0)]
    half = full_rows // 2
    rows = half // tp_size
    return [(tp_rank * rows, rows, 0), (half + tp_rank * rows, rows, rows)]


def read_shard(reader: HFCheckpointReader, wmap: WeightMap, rule: Rule, layer, dest: torch.Tensor,
                tp_rank: int, tp_size: int) -> None:
    """dest = this rank's shard of the Megatron tensor `rule` (at `layer`), reading only its bytes."""
    names = [n.format(i=layer) for n in rule.hf]
    for hf_name, shape in zip(names, wmap.hf_shapes(rule), strict=True):
        found = reader.shape_dtype(hf_name)[0]
        if tuple(found) != tuple(shape):
            raise ValueError(f"{hf_name}: shape {tuple(found)} in {reader.file_of(hf_name)}, expected {shape} from the config")
    full = wmap.full_shape(rule)
    dim = rule.tp_dim if tp_size > 1 else None
    want = list(full)
    if dim is not None:
        want[dim] //= tp_size
    if tuple(want) != tuple(dest.shape):
        raise ValueError(f"{rule.megatron}: shard shape {tuple(want)} does not match the parameter {tuple(dest.shape)}")
    if dim == 1:  # row-parallel linear (o_proj, down_proj): a column slice of one HF tensor
        if rule.layout != "copy":
            raise ValueError(f"{rule.megatron}: layout {rule.layout!r} split over dim 1 is not supported")
        reader.read_columns_into(names[0], dest, tp_rank * dest.shape[1])
        return
    meta = wmap.meta
    runs = _shard_runs(full[0], rule.tp_glu, tp_size, tp_rank) if dim == 0 else [(0, full[0], 0)]
    blocks = layouts.hf_row_blocks(rule.layout, full[0], meta.num_heads, meta.num_kv_heads, meta.head_dim,
                                   meta.vocab_size)
    if rule.layout == "vocab":
        dest.zero_()  # padding rows (ids >= vocab_size) are in no block
    for hf_name, name_blocks in zip(names, blocks, strict=True):
        hf_row = 0
        for block_start, block_rows in name_blocks:
            for run_start, run_rows, dest_start in runs:
                lo, hi = max(block_start, run_start), min(block_start + block_rows, run_start + run_rows)
                if lo < hi:
                    reader.read_rows_into(hf_name, dest.narrow(0, dest_start + lo - run_start, hi - lo),
                                          row_start=hf_row + lo - block_start)
            hf_row += block_rows


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, wmap: WeightMap, source: HFSource, tp_rank: int, tp_size: int) -> None:
    """Copies HF tensors into this rank's shards of the chunk's parameters.

    source: an `HFCheckpointReader` (each rank reads only its slices; see the module docstring) or
    a callable name -> full HF tensor (e.g. a state dict's `__getitem__`), sharded in memory.
    """
    inner = unwrap(model)
    offset = stage_layer_offset(inner)
    sliced = isinstance(source, HFCheckpointReader)
    for name, param in _mapped_params(inner, wmap):
        if sliced:
            rule, layer = wmap.resolve(name, offset)
            read_shard(source, wmap, rule, layer, param, tp_rank, tp_size)
            continue
        full = wmap.hf_to_megatron(name, source, layer_offset=offset)
        dim, glu = wmap.tp_split(name)
        shard = layouts.shard_tp(full, dim, glu, tp_size, tp_rank)
        if tuple(shard.shape) != tuple(param.shape):
            raise ValueError(f"{name}: shard shape {tuple(shard.shape)} does not match the parameter {tuple(param.shape)}")
        param.copy_(shard)
    tied_output = getattr(inner, "output_layer", None)
    if wmap.meta.tied_embeddings and tied_output is not None and getattr(tied_output, "weight", None) is not None:
        if not getattr(inner, "pre_process", False):
            if sliced:
                rule, _ = wmap.resolve("embedding.word_embeddings.weight")
                read_shard(source, wmap, rule, None, tied_output.weight, tp_rank, tp_size)
                return
            full = wmap.hf_to_megatron("embedding.word_embeddings.weight", source)
            tied_output.weight.copy_(layouts.shard_tp(full, 0, False, tp_size, tp_rank))


@torch.no_grad()
def export_hf_weights(
    model: torch.nn.Module, wmap: WeightMap, gather: Callable[[torch.Tensor, str], list[torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, full tensor) for every mapped parameter of this chunk.

    gather(shard, name) returns all TP ranks' shards of the parameter (e.g. an all_gather over the
    TP group); fused HF tensors (q/k/v, gate/up) are yielded together, one after the other.
    """
    inner = unwrap(model)
    offset = stage_layer_offset(inner)
    for name, param in _mapped_params(inner, wmap):
        dim, glu = wmap.tp_split(name)
        full = layouts.gather_tp(gather(param.detach(), name), dim, glu)
        yield from wmap.megatron_to_hf(name, full, layer_offset=offset)
