"""The one check that a Megatron dist checkpoint (torch_dist) holds data only, before anything loads it.

    verify_checkpoint_is_data(ckpt_dir)   # raises CheckpointError, one line naming file and global

Megatron's `dist_checkpointing.load` unpickles the DCP `.metadata` with plain `pickle`, and DCP's
`load_bytes` reads every byte item (a Megatron `ShardedObject`: RNG states, `_extra_state`, the
distributed optimizer's bucket layout) with `torch.load(weights_only=False)`; either would run
any callable a checkpoint from an untrusted source names. This guard reads, without executing:

- `.metadata` through the converter's allow-list unpickler (`dist_read.read_metadata`);
- each byte item (a `BytesStorageMetadata` entry, located through `storage_data` in its
  `.distcp` file) and `common.pt` with `torch.load(weights_only=True)` and no tensor data
  (`skip_data`). Besides torch's own set, that admits what megatron.core registers on import
  (`megatron/core/safe_globals.py`: numpy arrays of the RNG state, Megatron's enums, ...), which
  is all a trainer checkpoint's objects hold (`trainer_state.py`).

Tensor items are read by DCP with `weights_only=True` already. Every rank checks the files it is
about to read (no collective, the same verdict on every rank of a shared filesystem). The load
that follows re-reads the files: the guard protects against a crafted checkpoint, not against
one rewritten between the check and the load.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import megatron.core  # noqa: F401  (registers Megatron's safe globals with torch.serialization)
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from maspo_megatron.checkpoint.dist_read import read_metadata, refusal_message
from maspo_megatron.checkpoint.errors import CheckpointError

_TORCH_REFUSED = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
_TORCH_DETAIL = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")
COMMON_FILE = "common.pt"  # Megatron's non-sharded state (trainer: driver, scheduler, layout)


def verify_checkpoint_is_data(ckpt_dir: str | Path) -> None:
    """Raises CheckpointError (one line: file and refused global) unless every pickle in the
    checkpoint at `ckpt_dir` unpickles to data without calling anything outside the allow-lists."""
    ckpt_dir = Path(ckpt_dir)
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
            with open(path, "rb") as handle:
                handle.seek(info.offset)
                data = handle.read(info.length)
        except OSError as exc:
            raise CheckpointError(f"{where}: unreadable ({exc.strerror or exc})") from None
        if len(data) != info.length:
            raise CheckpointError(f"{where}: truncated (item of {info.length} bytes at offset {info.offset})")
        _load_data_only(io.BytesIO(data), where)
    common = ckpt_dir / COMMON_FILE
    if common.is_file():
        with open(common, "rb") as handle:
            _load_data_only(handle, str(common))


def _load_data_only(stream, where: str) -> None:
    """torch.load with weights_only=True and no tensor bytes; a refusal -> one-line CheckpointError."""
    try:
        with torch.serialization.skip_data():
            torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        refused = _TORCH_REFUSED.search(text)
        if refused is not None:
            name = refused.group(1)
            raise CheckpointError(refusal_message(where, name if "." in name else f"builtins.{name}")) from None
        detail = _TORCH_DETAIL.search(text)
        reason = detail.group(1).strip() if detail else (text.splitlines() or ["not data"])[0]
        raise CheckpointError(f"{where}: refuses to unpickle ({reason}; a checkpoint must hold data only)") from None
    except (RuntimeError, EOFError) as exc:  # not a torch.save archive
        raise CheckpointError(f"{where}: not a torch.save item ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") \
            from None
