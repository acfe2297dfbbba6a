"""Streaming HF checkpoint reads: tensors one by one, or only the rows/columns of one shard.

Reading never loads a whole checkpoint: safetensors tensors are located (`locate`: file, byte
offset) for file-to-file kernel copies, or read one by one with plain file reads (no memory
map, so resident memory is the tensor, not the file); `*.bin` files are read with
`torch.load(weights_only=True, mmap=True)`, which refuses pickled objects instead of executing
them. Every error names the file and/or tensor. The writer: `hf_writer.py`.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Optional

import torch

from maspo_megatron.checkpoint.errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


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


def read_exact_into(path: str | os.PathLike, offset: int, dest: torch.Tensor, truncated: str) -> None:
    """Fills the contiguous `dest` with the bytes of `path` from `offset`, no intermediate buffer;
    a file that ends first raises CheckpointError(truncated)."""
    read_runs_into(path, [(offset, dest)], truncated)


def read_runs_into(path: str | os.PathLike, runs, truncated: str) -> None:
    """For each (file offset, contiguous tensor) of `runs`: fills the tensor with the file's bytes
    from that offset, straight into its memory (one open file for all runs, e.g. the rows of a
    column slice); a file that ends first raises CheckpointError(truncated)."""
    with open(path, "rb", buffering=0) as handle:
        for offset, dest in runs:
            view = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
            handle.seek(offset)
            done = 0
            while done < len(view):  # raw reads may return short counts
                got = handle.readinto(view[done:])
                if not got:
                    raise CheckpointError(truncated)
                done += got


class SafetensorsFile:
    """One .safetensors file read with plain `readinto` (no memory map): resident memory is the
    tensor asked for, not the pages of the file touched so far."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as handle:
                header_len = int.from_bytes(handle.read(8), "little")
                if header_len <= 0 or 8 + header_len > size:
                    raise ValueError(f"header length {header_len} does not fit the file ({size} bytes)")
                header = json.loads(handle.read(header_len))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a valid safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries: dict[str, tuple[tuple[int, ...], torch.dtype, int, int]] = {}
        for name, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: bad header entry for tensor {name}") from None
            if end - begin != torch.Size(shape).numel() * dtype.itemsize or self.data_start + end > size:
                raise CheckpointError(f"{path}: tensor {name} data does not match its shape or lies past the end of the file")
            self.entries[name] = (shape, dtype, begin, end)

    def get(self, name: str) -> torch.Tensor:
        shape, dtype, _, _ = self.entries[name]
        tensor = torch.empty(shape, dtype=dtype)
        self.read_rows_into(name, tensor)
        return tensor

    def read_rows_into(self, name: str, dest: torch.Tensor, row_start: int = 0) -> None:
        """Reads rows [row_start, row_start + dest.shape[0]) of tensor `name` straight into the
        contiguous `dest` (same dtype and trailing shape): no intermediate buffer."""
        shape, dtype, begin, end = self.entries[name]
        rows = dest.shape[0] if dest.dim() else 1
        if dest.dtype != dtype or tuple(dest.shape[1:]) != tuple(shape[1:]) or not dest.is_contiguous() \
                or row_start < 0 or (shape and row_start + rows > shape[0]):
            raise CheckpointError(f"{self.path}: tensor {name} {tuple(shape)} {dtype} cannot fill rows {row_start}.. "
                                  f"of {tuple(dest.shape)} {dest.dtype}")
        nbytes = dest.numel() * dtype.itemsize
        if nbytes == 0:
            return
        row_bytes = (end - begin) // shape[0] if shape else 0
        read_exact_into(self.path, self.data_start + begin + row_start * row_bytes, dest,
                        f"{self.path}: tensor {name} is truncated")

    def read_columns_into(self, name: str, dest: torch.Tensor, col_start: int) -> None:
        """dest[R, c] = tensor `name`[R, col_start : col_start + c] (a 2-D tensor), read row by row
        straight into the contiguous `dest`: only the slice's bytes are read."""
        shape, dtype, begin, _ = self.entries[name]
        if len(shape) != 2 or dest.dim() != 2 or dest.dtype != dtype or not dest.is_contiguous() \
                or dest.shape[0] != shape[0] or col_start < 0 or col_start + dest.shape[1] > shape[1]:
            raise CheckpointError(f"{self.path}: tensor {name} {tuple(shape)} {dtype} cannot fill columns {col_start}.. "
                                  f"of {tuple(dest.shape)} {dest.dtype}")
        if dest.numel() == 0:
            return
        first = self.data_start + begin + col_start * dtype.itemsize
        stride = shape[1] * dtype.itemsize
        read_runs_into(self.path, ((first + row * stride, dest[row]) for row in range(shape[0])),
                       f"{self.path}: tensor {name} is truncated")


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
        self._handles: dict[str, SafetensorsFile] = {}
        self._bin_cache: tuple[Optional[str], dict] = (None, {})
        self.bytes_read = 0  # tensor bytes fetched from the files so far (a whole .bin tensor counts in full)

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
            return {name: single.name for name in SafetensorsFile(single).entries}
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

    def _safe_file(self, path: Path) -> SafetensorsFile:
        key = str(path)
        if key not in self._handles:
            self._handles[key] = SafetensorsFile(path)  # the parsed header only
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
            entry = self._safe_file(path).entries.get(name)
            if entry is None:
                raise CheckpointError(f"{path}: tensor {name} listed in the index is not in the file")
            return entry[0], entry[1]
        tensor = self._bin_state(path)[name]
        return tuple(tensor.shape), tensor.dtype

    def get(self, name: str) -> torch.Tensor:
        path = self.file_of(name)
        try:
            if path.suffix == ".safetensors":
                file = self._safe_file(path)
                if name not in file.entries:
                    raise CheckpointError(f"{path}: tensor {name} listed in the index is not in the file")
                tensor = file.get(name)
                self.bytes_read += tensor.numel() * tensor.element_size()
                return tensor
            state = self._bin_state(path)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({type(exc).__name__}: {exc})") from None
        if name not in state or not isinstance(state[name], torch.Tensor):
            raise CheckpointError(f"{path}: tensor {name} listed in the index is not in the file")
        self.bytes_read += state[name].numel() * state[name].element_size()
        return state[name]

    def locate(self, name: str) -> Optional[tuple[str, int, tuple[int, ...], torch.dtype]]:
        """(file, offset of its first byte, shape, dtype) of a safetensors tensor; None for .bin files."""
        file = self._safe_entry(name)
        if file is None:
            return None
        shape, dtype, begin, _ = file.entries[name]
        return str(file.path), file.data_start + begin, shape, dtype

    def _safe_entry(self, name: str) -> Optional[SafetensorsFile]:
        """The safetensors file holding `name` (None for .bin files)."""
        path = self.file_of(name)
        if path.suffix != ".safetensors":
            return None
        file = self._safe_file(path)
        if name not in file.entries:
            raise CheckpointError(f"{path}: tensor {name} listed in the index is not in the file")
        return file

    def read_rows_into(self, name: str, dest: torch.Tensor, row_start: int = 0) -> None:
        """dest[...] = tensor `name`[row_start : row_start + len(dest)]; safetensors files read only
        those rows (see `_read_slice`), other formats copied from the whole tensor."""
        if not self._read_slice(name, dest, lambda file, target: file.read_rows_into(name, target, row_start)):
            source = self.get(name)
            dest.copy_(source[row_start: row_start + dest.shape[0]] if dest.dim() else source)

    def read_columns_into(self, name: str, dest: torch.Tensor, col_start: int) -> None:
        """dest[R, c] = tensor `name`[:, col_start : col_start + c] (2-D); safetensors files read only
        the slice (row by row), other formats copied from the whole tensor."""
        if not self._read_slice(name, dest, lambda file, target: file.read_columns_into(name, target, col_start)):
            dest.copy_(self.get(name)[:, col_start: col_start + dest.shape[1]])

    def _read_slice(self, name: str, dest: torch.Tensor, read) -> bool:
        """read(file, target) from the safetensors file holding `name`: straight into `dest` when it is
        a contiguous CPU tensor of the file's dtype, else into a buffer of the slice only, then copied
        (cast / to the device). False (nothing read) for a .bin file."""
        file = self._safe_entry(name)
        if file is None:
            return False
        file_dtype = file.entries[name][1]
        direct = dest.dtype == file_dtype and dest.is_contiguous() and dest.device.type == "cpu"
        target = dest if direct else torch.empty(dest.shape, dtype=file_dtype, device="cpu")
        read(file, target)
        self.bytes_read += target.numel() * target.element_size()
        if not direct:
            dest.copy_(target)
        return True

    def close(self) -> None:
        self._handles.clear()
        self._bin_cache = (None, {})
