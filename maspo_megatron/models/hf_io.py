"""Streaming HF checkpoint I/O: read tensors one by one, write size-capped safetensors shards.

Reading never loads a whole checkpoint: safetensors tensors are located (`locate`: file, byte
offset) for file-to-file kernel copies, or read one by one with plain file reads (no memory
map, so resident memory is the tensor, not the file); `*.bin` files are read with
`torch.load(weights_only=True, mmap=True)`, which refuses pickled objects instead of executing
them. The shard writer takes tensors or byte runs of other files (`add_segments`). Every error
names the file and/or tensor.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Iterator, Optional

import torch

from maspo_megatron.models.byte_copy import Segment, SegmentCopier, write_all

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
                dtype = _ST_DTYPES[info["dtype"]]
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
        path = self.file_of(name)
        if path.suffix != ".safetensors":
            return None
        file = self._safe_file(path)
        if name not in file.entries:
            raise CheckpointError(f"{path}: tensor {name} listed in the index is not in the file")
        shape, dtype, begin, _ = file.entries[name]
        return str(path), file.data_start + begin, shape, dtype

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


_DTYPE_TO_ST = {v: k for k, v in _ST_DTYPES.items()}


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
            header[name] = {"dtype": _DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
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


def iter_tensors(reader: HFCheckpointReader, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names:
        yield name, reader.get(name)
