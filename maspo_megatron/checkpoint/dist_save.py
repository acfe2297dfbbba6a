"""Megatron dist checkpoints (torch_dist format) written and read one tensor chunk at a time.

Writing: the checkpoint is described with Megatron's own `ShardedTensor`s whose `data` are META
tensors (shape/dtype only) and saved through `dist_checkpointing.save` with a sharded strategy
that hands torch.distributed.checkpoint a planner resolving each chunk lazily: a chunk is
produced (read from HF, fused, padded) right before it is written and dropped after, so peak
memory is about one full tensor whatever the model size. Megatron writes `common.pt` and
`metadata.json`; the layout is exactly what `dist_checkpointing.load` expects at any TP/PP.

With a `SpliceTarget`, a producer may hand DCP a view of a never-touched placeholder instead of
data: the output stream then copies the chunk's bytes from its source files in the kernel
(`byte_copy`), so the bytes never enter this process.

Reading: `dist_read.py` (slices, for the converter) and `dist_load.py` (model/trainer state).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.planner import WriteItemType

from maspo_megatron.checkpoint.byte_copy import SpliceFileSystem, SpliceTarget
from maspo_megatron.checkpoint.errors import CheckpointError

ChunkProducer = Callable[[], torch.Tensor]


class _LazySavePlanner(MCoreSavePlanner):
    """Megatron's save planner, except tensor data comes from producers keyed by (key, offsets)."""

    def __init__(self, producers: dict[tuple[str, tuple[int, ...]], ChunkProducer], on_write: Callable[[int], None]):
        super().__init__(flatten_state_dict=False)
        self._producers = producers
        self._on_write = on_write
        self.error: Optional[BaseException] = None  # the producer's own error (DCP wraps it)

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        try:
            return self._produce(write_item)
        except BaseException as exc:
            self.error = self.error or exc
            raise

    def _produce(self, write_item) -> torch.Tensor:
        key = (write_item.index.fqn, tuple(write_item.index.offset))
        chunk = self._producers.pop(key)()
        expected = tuple(write_item.tensor_data.chunk.sizes)
        if chunk.dim() < len(expected) and tuple(chunk.shape) == expected[len(expected) - chunk.dim():]:
            chunk = chunk.reshape(expected)  # add the stacked-layer axis
        if tuple(chunk.shape) != expected:
            raise CheckpointError(f"{key[0]}: chunk at {key[1]} has shape {tuple(chunk.shape)}, expected {expected}")
        chunk = _exact_storage(chunk.to(write_item.tensor_data.properties.dtype).contiguous())
        self._on_write(chunk.numel() * chunk.element_size())
        return chunk


def _exact_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor re-based onto a storage of exactly its bytes (sharing the memory).

    A row block of a larger tensor (a TP chunk, half of fused gate/up) keeps the whole storage;
    DCP would clone it (torch.save writes whole storages), a full extra copy of the chunk."""
    nbytes = tensor.numel() * tensor.element_size()
    storage = tensor.untyped_storage()
    if storage.nbytes() == nbytes:
        return tensor
    start = tensor.storage_offset() * tensor.element_size()
    return torch.empty(0, dtype=tensor.dtype).set_(storage[start: start + nbytes], 0, tensor.shape)


class _LazyTorchDistStrategy(SaveShardedStrategy):
    """A synchronous torch_dist (version 1) save strategy over `_LazySavePlanner`."""

    def __init__(self, producers: dict, on_write: Callable[[int], None], splice: Optional[SpliceTarget]):
        super().__init__("torch_dist", 1)
        self._producers = producers
        self._on_write = on_write
        self._splice = splice

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        planner = _LazySavePlanner(self._producers, self._on_write)
        # torch.save's zip CRC32 costs more than the copy itself; torch.load does not need it
        previous_crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        # DCP's serial loader resolves each item right before writing it (filesystem._SerialCpuLoader),
        # so a chunk's placeholder is written before the next is made. thread_count=1 alone is not
        # enough: where CUDA is available DCP picks its overlapping loader, which resolves ~10 MB of
        # items ahead; per_thread_copy_ahead=0 keeps the serial one (a converter run on a GPU node
        # failed there, while the same conversion passed on CPU).
        writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1, sync_files=False, per_thread_copy_ahead=0)
        if self._splice is not None:
            writer.fs = SpliceFileSystem(self._splice)
        try:
            dcp.save(pyt_state_dict, storage_writer=writer, planner=planner)
            if self._splice is not None:
                self._splice.check_consumed()
        except BaseException:  # DCP's CheckpointException derives from BaseException
            own = planner.error or (self._splice.error if self._splice is not None else None)
            if own is not None:  # surface e.g. "tensor X: ..." instead of DCP's wrapper
                raise own from None
            raise
        finally:
            torch.serialization.set_crc32_options(previous_crc)


def meta_sharded_tensor(key: str, chunk_shape: tuple[int, ...], dtype: torch.dtype, *rank_offsets, prepend_axis_num: int = 0) -> ShardedTensor:
    """A ShardedTensor chunk without data: `rank_offsets` as in ShardedTensor.from_rank_offsets."""
    return ShardedTensor.from_rank_offsets(
        key, torch.empty(chunk_shape, dtype=dtype, device="meta"), *rank_offsets, replica_id=0, prepend_axis_num=prepend_axis_num
    )


def save_lazy(
    sharded_state_dict: dict,
    producers: dict[tuple[str, tuple[int, ...]], ChunkProducer],
    out_dir: Path,
    on_write: Callable[[int], None] = lambda nbytes: None,
    splice: Optional[SpliceTarget] = None,
) -> None:
    """Saves a sharded state dict of meta ShardedTensors (+ ShardedObjects); chunk data from `producers`.

    producers: {(checkpoint key, global offsets incl. the stacked-layer axis): () -> chunk tensor}.
    splice: the target a producer registers a placeholder chunk with (`SpliceTarget.expect`): the
    output streams then copy that chunk's bytes from its source files in the kernel.
    """
    strategy = _LazyTorchDistStrategy(producers, on_write, splice)
    dist_checkpointing.save(sharded_state_dict, str(out_dir), sharded_strategy=strategy)
    if producers:
        leftover = next(iter(producers))
        raise CheckpointError(f"{leftover[0]}: chunk at {leftover[1]} was planned but never written")


def extra_state_object(key: str, layer: int, num_layers: int) -> ShardedObject:
    """The (empty) `_extra_state` a Megatron linear layer keeps per layer (FP8 meta under TE)."""
    return ShardedObject(key, None, (num_layers,), (layer,), replica_id=0)
