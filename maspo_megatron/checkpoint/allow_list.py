"""What a checkpoint pickle may name, and the checks that read one without running anything else.

A pickle runs code only through the globals it names (`find_class`): each unpickler here refuses
every global outside its allow-list with `RefusedGlobal`, turned into one line by
`refusal_message` ("<file> (<key>): refuses to unpickle builtins.exec (...)").

- `MetadataUnpickler`: the DCP `.metadata` file (DCP's metadata dataclasses and enums, torch
  sizes/dtypes/layouts, plain containers).
- `load_data_only`: a `torch.save` item (`weights_only=True`, i.e. torch's allow-list plus what
  megatron.core registers: numpy RNG arrays, Megatron's enums, `io.BytesIO`).
- `check_extra_state`: the value of a module's `_extra_state` after `load_data_only`. Transformer
  Engine keeps its FP8 state there as a uint8 tensor holding a *plain pickle* (or, in older
  checkpoints, a `BytesIO` holding a `torch.save` file) and unpickles it itself in
  `set_extra_state`, outside any allow-list. The pickle is walked here with inert stand-ins:
  torch tensors (whose storages are nested `torch.save` files, checked with `load_data_only`),
  plain containers and TE's recipe classes (`transformer_engine.common.recipe`: dataclasses,
  enums); a callable elsewhere (e.g. a recipe's custom `amax_compute_algo`) is refused.
"""
from __future__ import annotations

import dataclasses
import enum
import io
import pickle
import re
from pathlib import Path

import megatron.core  # noqa: F401  (registers Megatron's safe globals with torch.serialization)
import torch

from maspo_megatron.checkpoint.errors import CheckpointError

_METADATA_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("torch.serialization", "_get_layout"),  # layout by name, e.g. 'torch.strided'
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
}
# DCP / Megatron metadata records: only their dataclasses and enums, never a function or another class
_METADATA_MODULE_PREFIXES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.")
_EXTRA_STATE_MODULE_PREFIXES = ("transformer_engine.common.recipe",)
_TORCH_REFUSED = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
_TORCH_DETAIL = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list; `qualname` is it ('builtins.eval')."""

    def __init__(self, qualname: str):
        super().__init__(f"global '{qualname}' is not allowed")
        self.qualname = qualname


def refusal_message(where: str | Path, qualname: str) -> str:
    """The one-line error for a checkpoint file that names a global outside the allow-list."""
    return f"{where}: refuses to unpickle {qualname} (a checkpoint must hold data only)"


def _is_torch_constant(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))


class MetadataUnpickler(pickle.Unpickler):
    """Allows DCP metadata records (dataclasses, enums), torch dtypes/layouts/formats and plain
    containers; nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or _is_torch_constant(module, name):
            return super().find_class(module, name)
        if module.startswith(_METADATA_MODULE_PREFIXES):
            found = super().find_class(module, name)
            if isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)):
                return found
        raise RefusedGlobal(f"{module}.{name}")


def load_data_only(stream, where: str, *, with_data: bool = False):
    """torch.load(weights_only=True) of one `torch.save` item, without its tensor bytes unless
    `with_data`; a refusal or a non-torch.save item -> one-line CheckpointError naming `where`."""
    try:
        if with_data:
            return torch.load(stream, map_location="cpu", weights_only=True)
        with torch.serialization.skip_data():
            return torch.load(stream, map_location="cpu", weights_only=True)
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


def check_extra_state(value, where: str) -> None:
    """Raises CheckpointError unless the `_extra_state` value (as `load_data_only(with_data=True)`
    returned it) is data that Transformer Engine's `set_extra_state` would unpickle safely."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.numel() > 0:
        _check_plain_pickle(value.detach().cpu().contiguous().numpy().tobytes(), where)
    elif isinstance(value, io.BytesIO):
        load_data_only(io.BytesIO(value.getvalue()), where)


class _Inert:
    """What an allow-listed class or tensor builder stands for while a pickle is checked: it
    accepts any construction and state, and holds nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


class _ExtraStateChecker(pickle.Unpickler):
    """Walks TE's plain extra-state pickle: nothing it names is imported or called except inert
    stand-ins, OrderedDict, torch constants, and the nested storage check."""

    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self._where = where

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        if _is_torch_constant(module, name):
            return getattr(torch, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):  # a tensor's storage: a nested torch.save file
            return self._storage_from_bytes
        if (module, name) in {("torch._utils", "_rebuild_tensor_v2"), ("torch", "Size")} \
                or module.startswith(_EXTRA_STATE_MODULE_PREFIXES):
            return _Inert
        raise RefusedGlobal(f"{module}.{name}")

    def _storage_from_bytes(self, data: bytes) -> _Inert:
        load_data_only(io.BytesIO(data), self._where)
        return _Inert()


def _check_plain_pickle(data: bytes, where: str) -> None:
    try:
        _ExtraStateChecker(data, where).load()
    except RefusedGlobal as exc:
        raise CheckpointError(refusal_message(where, exc.qualname)) from None
    except CheckpointError:
        raise
    except Exception as exc:  # a malformed pickle: TE would fail on it too
        raise CheckpointError(f"{where}: not a readable extra-state pickle ({type(exc).__name__}: {exc})") from None
