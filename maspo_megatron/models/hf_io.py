"""Streaming HF checkpoint I/O: read tensors one by one, write size-capped safetensors shards.

Reading never loads a whole checkpoint: safetensors files are opened lazily (memory-mapped) and
`*.bin` files are read with `torch.load(weights_only=True, mmap=True)`, which refuses pickled
objects instead of executing them. Every error names the file and/or tensor.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A bad checkpoint file or tensor; the message names it."""


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


def _load_bin(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refusing to load pickled objects (weights_only): {first}") from None
    except RuntimeError as exc:
        # mmap needs the zip format; an old-format file falls back to a plain weights_only load
        if "mmap" not in str(exc):
            raise CheckpointError(f"{path}: cannot read as a torch checkpoint: {str(exc).splitlines()[0]}") from None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc2:
            raise CheckpointError(f"{path}: refusing to load pickled objects (weights_only): {str(exc2).splitlines()[0]}") from None


class HFCheckpointReader:
    """Tensor-by-tensor access to an HF model dir (sharded or single-file, safetensors or .bin)."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: HF checkpoint directory not found")
        self.weight_map = self._weight_map()
        missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise CheckpointError(f"{self.dir / missing[0]}: shard listed in the index is missing ({len(missing)} missing)")
        self._handles: dict[str, object] = {}
        self._bin_cache: tuple[Optional[str], dict] = (None, {})

    def _weight_map(self) -> dict[str, str]:
        for index_name in (SAFE_INDEX, BIN_INDEX):
            index_path = self.dir / index_name
            if index_path.is_file():
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise CheckpointError(f"{index_path}: not a valid index ({type(exc).__name__}: {exc})") from None
                return dict(weight_map)
        single = self.dir / "model.safetensors"
        if single.is_file():
            with safe_open(single, framework="pt") as handle:
                return {name: single.name for name in handle.keys()}
        single_bin = self.dir / "pytorch_model.bin"
        if single_bin.is_file():
            return {name: single_bin.name for name in _load_bin(single_bin)}
        raise CheckpointError(f"{self.dir}: no model.safetensors, {SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX}")

    def names(self) -> list[str]:
        return list(self.weight_map)

    def file_of(self, name: str) -> Path:
        if name not in self.weight_map:
            raise CheckpointError(f"{name}: tensor not found in {self.dir}")
        return self.dir / self.weight_map[name]

    def _safe_handle(self, path: Path):
        key = str(path)
        if key not in self._handles:
            try:
                self._handles[key] = safe_open(path, framework="pt")
            except Exception as exc:
                raise CheckpointError(f"{path}: cannot open as safetensors ({type(exc).__name__}: {exc})") from None
        return self._handles[key]

    def _bin_state(self, path: Path) -> dict:
        # keep only one .bin file's (memory-mapped) dict alive at a time
        if self._bin_cache[0] != str(path):
            self._bin_cache = (str(path), _load_bin(path))
        return self._bin_cache[1]

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype from the file header, without reading the data (safetensors)."""
        path = self.file_of(name)
        if path.suffix == ".safetensors":
            sl = self._safe_handle(path).get_slice(name)
            return tuple(sl.get_shape()), _ST_DTYPES[sl.get_dtype()]
        tensor = self._bin_state(path)[name]
        return tuple(tensor.shape), tensor.dtype

    def get(self, name: str) -> torch.Tensor:
        path = self.file_of(name)
        try:
            if path.suffix == ".safetensors":
                return self._safe_handle(path).get_tensor(name)
            state = self._bin_state(path)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({type(exc).__name__}: {exc})") from None
        if name not in state or not isinstance(state[name], torch.Tensor):
            raise CheckpointError(f"{path}: tensor {name} listed in the index is not in the file")
        return state[name]

    def close(self) -> None:
        self._handles.clear()
        self._bin_cache = (None, {})


class ShardedSafetensorsWriter:
    """Writes tensors into `model-0000k-of-0000n.safetensors` shards of at most max_shard_bytes
    (a single larger tensor gets its own shard), plus `model.safetensors.index.json`.
    Holds at most one shard in memory."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int, dtype: Optional[torch.dtype] = None):
        self.dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0
        self.largest_shard_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in s for s in self._shards):
            raise CheckpointError(f"{name}: written twice")
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor
        self._pending_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        index = len(self._shards) + 1
        save_file(self._pending, self.dir / f"model-{index:05d}.partial.safetensors", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self.total_bytes += self._pending_bytes
        self.largest_shard_bytes = max(self.largest_shard_bytes, self._pending_bytes)
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> dict[str, str]:
        """Flushes, names the shards `model-0000k-of-0000n`, writes the index; returns the weight map."""
        self._flush()
        count = len(self._shards)
        weight_map = {}
        for k, names in enumerate(self._shards, start=1):
            final = f"model-{k:05d}-of-{count:05d}.safetensors"
            os.replace(self.dir / f"model-{k:05d}.partial.safetensors", self.dir / final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


def iter_tensors(reader: HFCheckpointReader, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        yield name, reader.get(name)
