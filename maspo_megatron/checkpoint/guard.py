"""The one check that a Megatron dist checkpoint (torch_dist) holds data only, before anything loads it.

    metadata = verify_checkpoint_is_data(ckpt_dir)   # raises CheckpointError, one line naming file and key

Every reader of a dist checkpoint goes through it: `dist_load.load_dist_checkpoint` (the trainer's
resume, `model.load`, the KL reference's reload) and the converter's `DistCheckpointReader`.

Megatron's `dist_checkpointing.load` unpickles the DCP `.metadata` with plain `pickle`, DCP's
`load_bytes` reads every byte item (a Megatron `ShardedObject`: RNG states, `_extra_state`, the
distributed optimizer's bucket layout) with `torch.load(weights_only=False)`, and Transformer
Engine's `set_extra_state` unpickles the FP8 state inside `_extra_state` with plain `pickle`;
each would run any callable a checkpoint from an untrusted source names. This guard reads,
without executing (allow-lists in `allow_list.py`):

- `.metadata` through the allow-list unpickler (`read_metadata`);
- each byte item (a `BytesStorageMetadata` entry, located through `storage_data` in its
  `.distcp` file) and `common.pt` with `torch.load(weights_only=True)` and no tensor data
  (`skip_data`), which admits what a trainer checkpoint's objects hold (`trainer_state.py`);
  an item is read through a window of its file (`FileView`), so the tensor bytes of e.g. the
  distributed optimizer's state are never read (a 400 MB item: 5 MB peak, 0.02 s);
- each `_extra_state` item with its data, and the pickle TE would unpickle from it
  (`allow_list.check_extra_state`).

Tensor items are read by DCP with `weights_only=True` already. Every rank checks the files it is
about to read (no collective, the same verdict on every rank of a shared filesystem). The load
that follows re-reads the files: the guard protects against a crafted checkpoint, not against
one rewritten between the check and the load.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Optional

from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from maspo_megatron.checkpoint.allow_list import (
    MetadataUnpickler,
    RefusedGlobal,
    check_extra_state,
    load_data_only,
    refusal_message,
)
from maspo_megatron.checkpoint.errors import CheckpointError

COMMON_FILE = "common.pt"  # Megatron's non-sharded state (trainer: driver, scheduler, layout)
MEGATRON_METADATA_FILE = "metadata.json"  # marks a Megatron dist checkpoint
EXTRA_STATE_SUFFIX = "_extra_state"  # a module's extra state (TE: FP8 scaling state, pickled)


class FileView(io.RawIOBase):
    """A read-only window [offset, offset + length) of an open binary file (one DCP item)."""

    def __init__(self, handle, offset: int, length: int):
        self._handle, self._offset, self._length, self._pos = handle, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._length + pos}[whence]
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._length - self._pos))
        self._handle.seek(self._offset + self._pos)
        got = self._handle.readinto(view[:count]) if count else 0
        self._pos += got
        return got


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with `.metadata` unpickled through the allow-list (or given, once read)."""

    def __init__(self, path: str, cached: Optional[Metadata] = None):
        super().__init__(path)
        self._cached = cached  # one unpickling per checkpoint, not one per load call

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self._cached is not None:
            return self._cached
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as handle:
                metadata = MetadataUnpickler(handle).load()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (not a torch_dist checkpoint?)") from None
        except RefusedGlobal as exc:
            raise CheckpointError(refusal_message(path, exc.qualname)) from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a readable DCP metadata pickle ({type(exc).__name__}: {exc})") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: not a torch.distributed.checkpoint Metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(ckpt_dir: str | Path) -> Metadata:
    """The DCP `.metadata` of a torch_dist checkpoint dir, unpickled through the allow-list."""
    return SafeFileSystemReader(str(ckpt_dir)).read_metadata()


def is_extra_state(fqn: str) -> bool:
    """Whether a byte item holds a module's `_extra_state` ('<module>._extra_state/shard_<offsets>_<shape>')."""
    return fqn.split("/", 1)[0].endswith(EXTRA_STATE_SUFFIX)


def verify_checkpoint_is_data(ckpt_dir: str | Path) -> Metadata:
    """Raises CheckpointError (one line: file, key and refused global) unless every pickle in the
    checkpoint at `ckpt_dir` unpickles to data without calling anything outside the allow-lists;
    returns its (allow-list unpickled) DCP metadata."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MEGATRON_METADATA_FILE).is_file():
        raise CheckpointError(f"{ckpt_dir / MEGATRON_METADATA_FILE}: missing (not a Megatron dist checkpoint)")
    metadata = read_metadata(ckpt_dir)
    byte_keys = {key for key, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)}
    for index, info in sorted(metadata.storage_data.items(), key=lambda kv: (kv[1].relative_path, kv[1].offset)):
        if index.fqn not in byte_keys:
            continue
        path = ckpt_dir / info.relative_path
        where = f"{path} ({index.fqn})"
        if info.transform_descriptors:
            raise CheckpointError(f"{where}: transformed byte items ({info.transform_descriptors}) are not supported")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise CheckpointError(f"{where}: unreadable ({exc.strerror or exc})") from None
        if info.offset + info.length > size:
            raise CheckpointError(f"{where}: truncated (item of {info.length} bytes at offset {info.offset})")
        with open(path, "rb", buffering=0) as handle:
            # a window on the file, not the item's bytes: skip_data reads the pickle, never the tensors
            item = io.BufferedReader(FileView(handle, info.offset, info.length))
            if is_extra_state(index.fqn):
                check_extra_state(load_data_only(item, where, with_data=True), where)
            else:
                load_data_only(item, where)
    common = ckpt_dir / COMMON_FILE
    if common.is_file():
        with open(common, "rb") as handle:
            load_data_only(handle, str(common))
    return metadata
