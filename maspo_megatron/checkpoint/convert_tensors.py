"""How one full Megatron tensor maps to checkpoint bytes, for the converters (`convert`).

- `chunking`: how a full tensor is cut into dist-checkpoint chunks (one per TP rank; fc1's gate
  and up apart).
- Byte-moving paths (no tensor in memory): `hf_row_map` says which HF file bytes hold each row
  of a full Megatron tensor, `fragment_rows` which rows a chunk holds; `write_spliced` writes the
  HF tensors of one Megatron tensor as runs of `.distcp` bytes. Rows are along dim 0, laid out
  per `layouts.hf_row_blocks`.
- In-memory paths (a dtype cast, `.bin` sources, chunks split along dim 1): `build_full` reads
  HF tensors straight into the fused tensor's rows, `write_qkv` writes q/k/v as row views.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from maspo_megatron.checkpoint.byte_copy import RowMap, merge_segments, slice_rows
from maspo_megatron.checkpoint.dist_read import DistCheckpointReader, row_map
from maspo_megatron.checkpoint.hf_reader import HFCheckpointReader
from maspo_megatron.checkpoint.hf_writer import ShardedSafetensorsWriter
from maspo_megatron.models.layouts import hf_row_blocks
from maspo_megatron.models.weight_map import MegatronTensor, WeightMap


@dataclasses.dataclass
class Chunking:
    key: str
    global_shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    rank_offsets: list[tuple]  # per chunk: tuple of (axis, fragment index, fragments)
    tp_ranks: list[int]
    prepend: int


def chunking(mt: MegatronTensor, wmap: WeightMap, tp: int) -> Chunking:
    """How a full tensor is cut into the checkpoint's chunks (one per TP rank; fc1: gate and up apart)."""
    dim = mt.rule.tp_dim
    prepend = 0 if mt.layer is None else 1
    global_shape = mt.shape if mt.layer is None else (wmap.meta.num_layers, *mt.shape)
    layer_axis = () if mt.layer is None else ((0, mt.layer, wmap.meta.num_layers),)
    if dim is None:
        return Chunking(mt.ckpt_key, global_shape, mt.shape, [layer_axis], [0], prepend)
    # a fused gate/up tensor is saved as [gate; up], each TP-split: 2 x TP equal pieces
    fragments = 2 * tp if mt.rule.tp_glu else tp
    chunk_shape = tuple(s // fragments if d == dim else s for d, s in enumerate(mt.shape))
    offsets = [layer_axis + ((prepend + dim, j, fragments),) for j in range(fragments)]
    return Chunking(mt.ckpt_key, global_shape, chunk_shape, offsets, [j % tp for j in range(fragments)], prepend)


def build_full(mt: MegatronTensor, wmap: WeightMap, reader: HFCheckpointReader, src_dtypes: dict) -> torch.Tensor:
    """The full Megatron tensor `mt` (what `wmap.hf_to_megatron` returns, bit for bit), with every
    HF tensor read straight into its rows of one preallocated output: no concatenation copies.
    Shapes were checked up front (`convert.check_hf_tensors`)."""
    names = [n.format(i=mt.layer) for n in mt.rule.hf]
    layout, meta = mt.rule.layout, wmap.meta
    out = torch.empty(mt.shape, dtype=src_dtypes[names[0]])
    if layout == "copy":
        reader.read_rows_into(names[0], out)
    elif layout == "vocab":  # out[Vp, H]: V rows read, the padding rows zero
        reader.read_rows_into(names[0], out[: meta.vocab_size])
        out[meta.vocab_size:].zero_()
    elif layout == "gate_up":  # out[2F, H] = [gate; up]
        half = mt.shape[0] // 2
        reader.read_rows_into(names[0], out[:half])
        reader.read_rows_into(names[1], out[half:])
    elif layout == "qkv":  # out[G, (Q/G + 2) * D, ...]: per group its q heads, then its k, then its v
        groups, q_rows = meta.num_kv_heads, (meta.num_heads // meta.num_kv_heads) * meta.head_dim
        grouped = out.view(groups, q_rows + 2 * meta.head_dim, *mt.shape[1:])
        for g in range(groups):
            reader.read_rows_into(names[0], grouped[g, :q_rows], row_start=g * q_rows)
            reader.read_rows_into(names[1], grouped[g, q_rows: q_rows + meta.head_dim], row_start=g * meta.head_dim)
            reader.read_rows_into(names[2], grouped[g, q_rows + meta.head_dim:], row_start=g * meta.head_dim)
    else:  # a layout this fast path does not know: the table's own transform
        return wmap.hf_to_megatron(mt.name, reader.get)
    return out


def row_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of one row (dim 0) of a contiguous tensor; a 1-D tensor's rows are its elements."""
    return torch.Size(shape[1:]).numel() * dtype.itemsize


def hf_row_map(mt: MegatronTensor, wmap: WeightMap, reader: HFCheckpointReader, dtype: torch.dtype) -> Optional[RowMap]:
    """Which HF file bytes hold each row of the full Megatron tensor `mt` (vocab padding rows: none),
    when every source is a safetensors tensor already in `dtype`; None otherwise (built in memory)."""
    meta = wmap.meta
    try:
        blocks = hf_row_blocks(mt.rule.layout, mt.shape[0], meta.num_heads, meta.num_kv_heads, meta.head_dim, meta.vocab_size)
    except ValueError:
        return None
    rows: RowMap = []
    for name, name_blocks in zip([n.format(i=mt.layer) for n in mt.rule.hf], blocks, strict=True):
        located = reader.locate(name)
        if located is None or located[3] != dtype:
            return None
        path, offset, shape, _ = located
        hf_row = 0
        for start, count in name_blocks:
            rows.append((start, count, path, offset + hf_row * row_bytes(shape, dtype)))
            hf_row += count
    return sorted(rows)


def fragment_rows(mt: MegatronTensor, piece: int, pieces: int) -> Optional[tuple[int, int]]:
    """Rows [lo, hi) of the full tensor that checkpoint chunk `piece` holds; None when the chunk
    is a column block (TP split along dim 1), which is not one run of rows."""
    dim = mt.rule.tp_dim
    if dim is None or pieces == 1:
        return 0, mt.shape[0]
    if dim != 0:
        return None
    per = mt.shape[0] // pieces
    return piece * per, (piece + 1) * per


def write_qkv(mt: MegatronTensor, wmap: WeightMap, full: torch.Tensor, writer: ShardedSafetensorsWriter) -> None:
    """q, k, v of a fused `full[G * (Q/G + 2) * D, ...]` written as per-group row blocks (views),
    the same bytes as `wmap.megatron_to_hf` without its three split copies."""
    meta = wmap.meta
    names = [n.format(i=mt.layer) for n in mt.rule.hf]
    q_rows, d = (meta.num_heads // meta.num_kv_heads) * meta.head_dim, meta.head_dim
    grouped = full.reshape(meta.num_kv_heads, q_rows + 2 * d, *full.shape[1:])
    for name, (lo, hi) in zip(names, ((0, q_rows), (q_rows, q_rows + d), (q_rows + d, q_rows + 2 * d)), strict=True):
        writer.add_parts(name, [grouped[g, lo:hi] for g in range(meta.num_kv_heads)])


def write_spliced(mt: MegatronTensor, wmap: WeightMap, reader: DistCheckpointReader, writer: ShardedSafetensorsWriter,
                   dtype: Optional[torch.dtype]) -> bool:
    """Writes the HF tensors of `mt` as runs of `.distcp` bytes copied file to file by the kernel
    (q/k/v: per-group row runs; gate/up: halves; vocab: padding rows left out). False, writing
    nothing, when the bytes are not runs of whole rows in the output dtype (then use `load`)."""
    source = reader.dtype(mt.ckpt_key)
    if dtype is not None and dtype != source:
        return False
    rows = row_map(reader, mt.ckpt_key, mt.layer)
    if rows is None:
        return False
    meta = wmap.meta
    blocks = hf_row_blocks(mt.rule.layout, mt.shape[0], meta.num_heads, meta.num_kv_heads, meta.head_dim, meta.vocab_size)
    nbytes = row_bytes(mt.shape, source)
    for name, name_blocks in zip([n.format(i=mt.layer) for n in mt.rule.hf], blocks, strict=True):
        segments = [seg for start, count in name_blocks for seg in slice_rows(rows, start, start + count, nbytes)]
        writer.add_segments(name, merge_segments(segments))
    return True
