"""Reading Megatron dist checkpoints (torch_dist) one slice at a time, without unpickling objects.

`DistCheckpointReader` loads the chunks overlapping one requested slice (e.g. layer i of a
stacked tensor), after the checkpoint passed the guard (`guard.verify_checkpoint_is_data`: `.metadata`
unpickled by an allow-list, every object item data only). Each chunk's pickle is read with `torch.load(weights_only=True)`
without its data, to check it is one contiguous tensor of the expected shape and dtype; the raw
bytes then go from the file straight into the output slice (one copy, where DCP's reader makes
three: file -> bytes -> loaded tensor -> slice), or, through `row_map`, are located for a
file-to-file kernel copy (never entering memory).
"""
from __future__ import annotations

import io
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Iterable, Optional

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from maspo_megatron.checkpoint.byte_copy import RowMap
from maspo_megatron.checkpoint.errors import CheckpointError
from maspo_megatron.checkpoint.guard import FileView, SafeFileSystemReader, verify_checkpoint_is_data
from maspo_megatron.checkpoint.hf_reader import read_exact_into


class DistCheckpointReader:
    """Slices of tensors from a torch_dist checkpoint dir (needs torch.distributed initialised)."""

    def __init__(self, ckpt_dir: str | Path):
        self.dir = Path(ckpt_dir)
        self.metadata = verify_checkpoint_is_data(self.dir)  # the same check as every other load
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        for key, md in self.tensors.items():
            for chunk in md.chunks:
                if any(o + s > g for o, s, g in zip(chunk.offsets, chunk.sizes, md.size, strict=True)):
                    raise CheckpointError(f"{self.dir}: chunk of {key} at {tuple(chunk.offsets)} lies outside its shape {tuple(md.size)}")

    def global_shape(self, key: str) -> tuple[int, ...]:
        if key not in self.tensors:
            raise CheckpointError(f"{key}: tensor not found in {self.dir}")
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def load(self, requests: Iterable[tuple[str, Optional[int]]]) -> list[torch.Tensor]:
        """Loads [key, layer] slices: layer=None -> the whole tensor, else tensor[layer].

        Each slice is read straight from the chunk files into its output (`read_direct`); slices
        that a chunk covers only in part (chunks spanning several layers) go through DCP's reader.
        """
        out, rest = [], []
        for key, layer in requests:
            tensor = read_direct(self, key, layer)
            out.append(tensor)
            if tensor is None:
                rest.append((len(out) - 1, key, layer))
        if rest:
            for (idx, _, _), tensor in zip(rest, self._load_dcp([(k, lay) for _, k, lay in rest]), strict=True):
                out[idx] = tensor
        return out

    def _load_dcp(self, requests: list[tuple[str, Optional[int]]]) -> list[torch.Tensor]:
        state, targets = {}, []
        for idx, (key, layer) in enumerate(requests):
            shape = self.global_shape(key)
            if layer is None:
                sh = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=self.dtype(key)), replica_id=0)
            else:
                if not 0 <= layer < shape[0]:
                    raise CheckpointError(f"{key}: layer {layer} out of range (checkpoint has {shape[0]})")
                # a [1, ...] slice of the stacked tensor; without a prepended axis Megatron takes
                # the path that reads one fragment of a grid in a single process
                data = torch.empty((1, *shape[1:]), dtype=self.dtype(key))
                sh = ShardedTensor.from_rank_offsets(key, data, (0, layer, shape[0]), replica_id=0)
            state[f"t{idx}"] = sh
            targets.append(sh.data if layer is None else sh.data[0])  # filled in place
        sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(state)
        pyt_state = mcore_to_pyt_state_dict(sharded, True)
        # no_dist: each process reads its own slices; DCP must not pair up calls across ranks. DCP warns
        # on every no_dist load that it "assumes a single process": that is the intent here, not news.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(pyt_state, storage_reader=SafeFileSystemReader(str(self.dir), self.metadata),
                     planner=MCoreLoadPlanner(), no_dist=True)
        return targets


def _chunk_data_offset(view: FileView, nbytes: int, where: str) -> int:
    """Offset inside one torch.save item (a zip archive) of its single tensor's raw bytes."""
    with zipfile.ZipFile(view) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename and not i.filename.endswith("/")]
    if len(records) != 1 or records[0].compress_type != zipfile.ZIP_STORED or records[0].file_size != nbytes:
        raise CheckpointError(f"{where}: expected one stored tensor record of {nbytes} bytes")
    view.seek(records[0].header_offset)
    header = view.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{where}: bad zip local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return records[0].header_offset + 30 + name_len + extra_len


def _locate_chunks(reader: DistCheckpointReader, key: str, layer: Optional[int]):
    """Where the bytes of tensor[layer] (or the whole tensor) lie: (slice shape, dtype, [(chunk
    offsets within the slice, chunk sizes, file, offset of its raw bytes)]), or None when some
    chunk lies only partly inside the slice.

    Each item's pickle is read with `weights_only=True` and without its data (`skip_data`) to
    check it holds exactly a contiguous tensor of the metadata's shape and dtype; nothing else in
    the file is interpreted.
    """
    md = reader.tensors.get(key)
    if md is None:
        raise CheckpointError(f"{key}: tensor not found in {reader.dir}")
    shape, dtype = tuple(md.size), md.properties.dtype
    if layer is not None and not 0 <= layer < shape[0]:
        raise CheckpointError(f"{key}: layer {layer} out of range (checkpoint has {shape[0]})")
    lo = (0,) * len(shape) if layer is None else (layer,) + (0,) * (len(shape) - 1)
    hi = shape if layer is None else (layer + 1, *shape[1:])
    slice_shape = tuple(h - low for low, h in zip(lo, hi, strict=True))
    found, covered = [], 0
    for chunk in md.chunks:
        c_lo, c_size = tuple(chunk.offsets), tuple(chunk.sizes)
        if any(o + s <= a or o >= b for o, s, a, b in zip(c_lo, c_size, lo, hi, strict=True)):
            continue  # no overlap
        if any(o < a or o + s > b for o, s, a, b in zip(c_lo, c_size, lo, hi, strict=True)):
            return None  # the chunk reaches outside the slice
        info = reader.metadata.storage_data.get(MetadataIndex(key, c_lo))
        if info is None or getattr(info, "transform_descriptors", None):
            return None
        found.append((tuple(o - a for o, a in zip(c_lo, lo, strict=True)), c_size, info))
        covered += torch.Size(c_size).numel()
    if covered != torch.Size(slice_shape).numel():
        raise CheckpointError(f"{key}: the chunks in {reader.dir} do not cover {'all of it' if layer is None else f'layer {layer}'}")
    plan, handles = [], {}
    try:
        for rel_lo, c_size, info in found:
            path = reader.dir / info.relative_path
            if info.relative_path not in handles:
                handles[info.relative_path] = open(path, "rb", buffering=0)
            view = FileView(handles[info.relative_path], info.offset, info.length)
            where = f"{path} ({key} at {info.offset})"
            try:
                with torch.serialization.skip_data():
                    meta = torch.load(io.BufferedReader(view), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"{where}: refusing to load: {str(exc).splitlines()[0]}") from None
            nbytes = torch.Size(c_size).numel() * dtype.itemsize
            if not isinstance(meta, torch.Tensor) or tuple(meta.shape) != c_size or meta.dtype != dtype \
                    or not meta.is_contiguous() or meta.storage_offset() != 0 or meta.untyped_storage().nbytes() != nbytes:
                raise CheckpointError(f"{where}: item does not hold a contiguous {dtype} tensor of shape {c_size}")
            plan.append((rel_lo, c_size, str(path), info.offset + _chunk_data_offset(view, nbytes, where)))
    finally:
        for handle in handles.values():
            handle.close()
    return slice_shape, dtype, plan


def row_map(reader: DistCheckpointReader, key: str, layer: Optional[int]) -> Optional[RowMap]:
    """The rows (dim 0) of tensor[layer] (or of the whole tensor) as runs of file bytes, when every
    chunk holds whole rows (TP split along dim 0 only); None otherwise (then use `load`)."""
    located = _locate_chunks(reader, key, layer)
    if located is None:
        return None
    slice_shape, _, plan = located
    skip = 0 if layer is None else 1  # the stacked-layer axis
    rows: RowMap = []
    for rel_lo, c_size, path, data_offset in plan:
        if any(o != 0 for o in rel_lo[skip + 1:]) or c_size[skip + 1:] != slice_shape[skip + 1:]:
            return None
        start = rel_lo[skip] if len(rel_lo) > skip else 0
        rows.append((start, c_size[skip] if len(c_size) > skip else 1, path, data_offset))
    return sorted(rows)


def read_direct(reader: DistCheckpointReader, key: str, layer: Optional[int]) -> Optional[torch.Tensor]:
    """tensor[layer] (or the whole tensor) read from the chunk files into one new tensor, each
    chunk's bytes going straight into its place (a bounce buffer only where that place is strided).
    Returns None when some chunk lies only partly inside the slice (`_locate_chunks`)."""
    located = _locate_chunks(reader, key, layer)
    if located is None:
        return None
    slice_shape, dtype, plan = located
    target = torch.empty(slice_shape, dtype=dtype)
    for rel_lo, c_size, path, data_offset in plan:
        dest = target
        for dim, (o, s) in enumerate(zip(rel_lo, c_size, strict=True)):
            dest = dest.narrow(dim, o, s)
        bounce = dest if dest.is_contiguous() else torch.empty(dest.shape, dtype=dtype)
        read_exact_into(path, data_offset, bounce, f"{path} ({key} at {data_offset}): truncated")
        if bounce is not dest:
            dest.copy_(bounce)
    return target if layer is None else target[0]
