"""Planned, size-capped safetensors shards written tensor by tensor (HF checkpoints out).

The writer takes tensors, row blocks of tensors, or byte runs of other files (`add_segments`,
copied by the kernel); nothing but the tensor being written is held in memory. The reader:
`hf_reader.py`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from maspo_megatron.checkpoint.byte_copy import Segment, SegmentCopier, write_all
from maspo_megatron.checkpoint.errors import CheckpointError
from maspo_megatron.checkpoint.hf_reader import SAFE_INDEX, SAFETENSORS_DTYPES


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '1.5GiB' / '1234' -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    raw = text.strip().upper()
    unit = next((u for u in units if raw.endswith(u)), "")
    number, scale = raw[: len(raw) - len(unit)].strip(), units.get(unit, 1)
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"max_shard_size: cannot parse {text!r} (e.g. 5GB, 500MB)") from None
    if value <= 0:
        raise ValueError(f"max_shard_size: {text!r} must be positive")
    return int(value * scale)




_DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


class ShardedSafetensorsWriter:
    """Streams tensors straight into `model-0000k-of-0000n.safetensors` files, planned up front.

    The caller declares every tensor (name, shape, dtype) in write order; shards are cut at
    max_shard_bytes (a larger single tensor gets its own shard), each header is written when its
    shard opens, and each tensor's bytes go to disk as soon as `add` receives it. Nothing but the
    tensor being written is held in memory. With `owned_shards`, this writer writes only those
    shards (several processes split one output) and `wants(name)` says which tensors it needs.
    `write_index` writes `model.safetensors.index.json` (once, by one process).
    """

    def __init__(self, out_dir: str | os.PathLike, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int, owned_shards: Optional[set[int]] = None):
        self.dir = Path(out_dir)
        self._entries = {name: (tuple(shape), dtype) for name, shape, dtype in entries}
        if len(self._entries) != len(entries):
            raise CheckpointError("safetensors writer: a tensor name is declared twice")
        shards: list[list[str]] = [[]]
        size = 0
        for name, shape, dtype in entries:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        count = len(shards)
        self.shard_names = [f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
        self._shard_of = {n: k for k, names in enumerate(shards) for n in names}
        self._shards = shards
        self.owned = set(range(count)) if owned_shards is None else set(owned_shards)
        self._written = [0] * count  # tensors written per shard, in declared order
        self._files: dict[int, int] = {}  # shard -> raw fd (every write is one large write or a kernel copy)
        self._copier = SegmentCopier()
        self.total_bytes = sum(torch.Size(s).numel() * d.itemsize for s, d in self._entries.values())

    def wants(self, name: str) -> bool:
        return self._shard_of.get(name) in self.owned

    def _open_shard(self, k: int):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in self._shards[k]:
            shape, dtype = self._entries[name]
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": _DTYPE_TO_SAFETENSORS[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        fd = os.open(self.dir / self.shard_names[k], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        write_all(fd, len(raw).to_bytes(8, "little") + raw)
        return fd

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Writes the next declared tensor of its shard (cast to its declared dtype); others are ignored."""
        self.add_parts(name, [tensor])

    def add_parts(self, name: str, parts: list[torch.Tensor]) -> None:
        """`add` for a tensor given as row blocks: parts[k][rows_k, ...] concatenated along dim 0
        (e.g. per-group views of a fused qkv): each block is written as is, never concatenated."""
        k = self._next_of_shard(name)
        if k is None:
            return
        shape, dtype = self._entries[name]
        if len(parts) == 1:
            found = tuple(parts[0].shape)
        elif all(p.dim() == len(shape) and p.dim() > 0 and tuple(p.shape[1:]) == shape[1:] for p in parts):
            found = (sum(p.shape[0] for p in parts), *shape[1:])
        else:
            found = tuple(tuple(p.shape) for p in parts)
        if found != shape:
            raise CheckpointError(f"{name}: shape {found}, declared {shape}")
        if k not in self._files:
            self._files[k] = self._open_shard(k)
        for part in parts:
            data = part.detach().to(dtype).contiguous().reshape(-1).view(torch.uint8)
            write_all(self._files[k], data.numpy())
        self._done_with(k)

    def add_segments(self, name: str, segments: list[Segment]) -> None:
        """`add` for a tensor whose bytes (already in the declared dtype) lie in other files:
        copied file to file by the kernel, never through this process's memory."""
        k = self._next_of_shard(name)
        if k is None:
            return
        shape, dtype = self._entries[name]
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if sum(s.nbytes for s in segments) != nbytes:
            raise CheckpointError(f"{name}: {sum(s.nbytes for s in segments)} bytes given, declared {nbytes} ({shape} {dtype})")
        if k not in self._files:
            self._files[k] = self._open_shard(k)
        self._copier.copy(self._files[k], segments)
        self._done_with(k)

    def _next_of_shard(self, name: str) -> Optional[int]:
        """The shard `name` goes to if this writer owns it (checking the declared order), else None."""
        if name not in self._shard_of:
            raise CheckpointError(f"{name}: not declared to the safetensors writer")
        k = self._shard_of[name]
        if k not in self.owned:
            return None
        expected = self._shards[k][self._written[k]] if self._written[k] < len(self._shards[k]) else "nothing"
        if name != expected:
            raise CheckpointError(f"{name}: written out of order (expected {expected})")
        return k

    def _done_with(self, k: int) -> None:
        self._written[k] += 1
        if self._written[k] == len(self._shards[k]):
            os.close(self._files.pop(k))

    def finish(self) -> None:
        """Checks every tensor of the owned shards was written."""
        for k in sorted(self.owned):
            if self._written[k] != len(self._shards[k]):
                raise CheckpointError(f"{self._shards[k][self._written[k]]}: declared but never written")

    def write_index(self) -> dict[str, str]:
        weight_map = {n: self.shard_names[k] for n, k in self._shard_of.items()}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def abort(self) -> None:
        """Closes whatever is open (after `finish`, or on error)."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        self._copier.close()
