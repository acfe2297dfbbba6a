"""SGLang's `load_format="flattened_bucket"`: many tensors in one uint8 buffer plus per-tensor metadata.

Wire format (sglang 0.5.23, `sglang.srt.weight_sync.tensor_bucket`): the engine receives, per SGLang
TP rank, `MultiprocessingSerializer.serialize({"flattened_tensor": buf[B] uint8, "metadata": [
FlattenedTensorMetadata(name, shape, dtype, start_idx, end_idx, numel), ...]}, output_str=True)`,
i.e. a base64 string of a `ForkingPickler` pickle. `start_idx`/`end_idx`/`numel` count BYTES of the
uint8 buffer (each tensor is `flatten().view(torch.uint8)`), so one bucket may mix dtypes. The
receiver rebuilds each tensor as `buf[start_idx:end_idx].view(dtype).reshape(shape)`; that view
needs the byte offset to be a multiple of the element size, so each tensor starts at a multiple of
`ALIGN_BYTES` (the format allows gaps: only start/end are read).

SGLang unpickles with an allowlist (`SafeUnpickler`): the metadata objects must be instances of
`sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata`: `_SGLangNamePickler` writes that global
by name (sglang need not be installed on training nodes), and CUDA handles name their GPU by UUID as
SGLang's patched reductions expect. `load_payload` is the strict receiving side, used by
tests and the CPU stand-in server.
"""
from __future__ import annotations

import base64
import copyreg
import dataclasses
import io
import pickle
from typing import Any, Iterable, List, Sequence, Tuple

import torch

SGLANG_METADATA_MODULE = "sglang.srt.weight_sync.tensor_bucket"
SGLANG_METADATA_CLASS = "FlattenedTensorMetadata"
LOAD_FORMAT = "flattened_bucket"
ALIGN_BYTES = 16  # >= every element size; an fp8 tensor of odd size must not misalign the fp32 one after it

# Module prefixes SGLang's SafeUnpickler admits for weight payloads (sglang 0.5.23, utils/common.py).
SGLANG_ALLOWED_MODULE_PREFIXES = (
    "builtins.", "collections.", "copyreg.", "functools.", "itertools.", "operator.", "types.", "weakref.",
    "torch.", "multiprocessing.resource_sharer.", "multiprocessing.reduction.", "pickletools.",
    SGLANG_METADATA_MODULE + ".",
)
_DENIED = {("builtins", "eval"), ("builtins", "exec"), ("builtins", "compile"), ("types", "CodeType"),
           ("types", "FunctionType")}


@dataclasses.dataclass
class FlattenedTensorMetadata:
    """One tensor inside a flattened bucket; indices count bytes of the uint8 buffer."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def flatten_tensors(named_tensors: Sequence[Tuple[str, torch.Tensor]],
                    release: bool = False) -> Tuple[torch.Tensor, List[FlattenedTensorMetadata]]:
    """[(name, tensor)] -> (buf[total_bytes] uint8, metadata). Always a fresh buffer (never aliases inputs).

    release=True (named_tensors must be a list): each entry is replaced by (name, None) once copied,
    so a bucket and its buffer are never both fully resident (the buffer's pages are touched only as
    tensors are copied in, and each tensor is freed right after, unless someone else holds it).
    """
    if not named_tensors:
        raise ValueError("flatten_tensors: cannot build an empty bucket")
    metadata: List[FlattenedTensorMetadata] = []
    offset_bytes = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        metadata.append(FlattenedTensorMetadata(name, tensor.shape, tensor.dtype, offset_bytes,
                                                offset_bytes + nbytes, nbytes))
        offset_bytes = -(-(offset_bytes + nbytes) // ALIGN_BYTES) * ALIGN_BYTES
    device = named_tensors[0][1].device
    buf = torch.empty(metadata[-1].end_idx, dtype=torch.uint8, device=device)
    for index, meta in enumerate(metadata):
        tensor = named_tensors[index][1]
        # reshape(-1) of a non-contiguous tensor copies once; view(uint8) needs a contiguous 1-D tensor.
        buf[meta.start_idx:meta.end_idx].copy_(tensor.reshape(-1).contiguous().view(torch.uint8))
        if release:
            named_tensors[index] = (meta.name, None)
        del tensor
    return buf, metadata


def reconstruct_tensors(buf: torch.Tensor, metadata: Iterable[Any]) -> List[Tuple[str, torch.Tensor]]:
    """Inverse of `flatten_tensors` (views into `buf`, no copies); accepts any object with the metadata fields."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError(f"flattened bucket: expected a 1-D uint8 buffer, got {tuple(buf.shape)} {buf.dtype}")
    out = []
    for meta in metadata:
        if not 0 <= meta.start_idx <= meta.end_idx <= buf.numel() or meta.end_idx - meta.start_idx != meta.numel:
            raise ValueError(f"flattened bucket: metadata of {meta.name!r} ({meta.start_idx}:{meta.end_idx}, "
                             f"numel {meta.numel}) does not fit a buffer of {buf.numel()} bytes")
        out.append((meta.name, buf[meta.start_idx:meta.end_idx].view(meta.dtype).reshape(meta.shape)))
    return out


# Position of the CUDA device index among the arguments torch's `reduce_tensor` returns for
# `rebuild_cuda_tensor` (torch/multiprocessing/reductions.py; sglang 0.5.23 patch_torch.py names it the same).
_REBUILD_CUDA_DEVICE_ARG = 6


def device_uuid(index: int) -> str:
    import torch

    return str(torch.cuda.get_device_properties(index).uuid)


def reduce_tensor_by_device_uuid(tensor: torch.Tensor):
    """torch's CUDA-IPC reduction with the device named by its UUID instead of this process's index.
    SGLang's workers apply `monkey_patch_torch_reductions` (srt/utils/patch_torch.py), whose rebuild maps
    a UUID string to their own index: the trainer and a server may see the same GPU under different
    CUDA_VISIBLE_DEVICES numbers, and an index would open the wrong one. CPU tensors are unchanged."""
    from torch.multiprocessing import reductions

    rebuild, args = reductions.reduce_tensor(tensor)
    if rebuild is reductions.rebuild_cuda_tensor and isinstance(args[_REBUILD_CUDA_DEVICE_ARG], int):
        args = (*args[:_REBUILD_CUDA_DEVICE_ARG], device_uuid(args[_REBUILD_CUDA_DEVICE_ARG]),
                *args[_REBUILD_CUDA_DEVICE_ARG + 1:])
    return rebuild, args


class _SGLangNamePickler(pickle._Pickler):  # the pure-Python pickler lets `save` write opcodes itself
    """Pickles our metadata exactly as sglang's own dataclass pickles (NEWOBJ + BUILD of its state),
    under the global name `sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata`."""

    def __init__(self, file: io.BytesIO, share_memory: bool):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        table = copyreg.dispatch_table.copy()
        if share_memory:  # torch's reducers: CUDA IPC handles instead of bytes
            from multiprocessing.reduction import ForkingPickler

            from torch.multiprocessing import reductions

            table.update(ForkingPickler._extra_reducers)
            for cls, reducer in list(table.items()):
                if reducer is reductions.reduce_tensor:
                    table[cls] = reduce_tensor_by_device_uuid
        self.dispatch_table = table

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if type(obj) is FlattenedTensorMetadata:
            self.save(SGLANG_METADATA_MODULE)
            self.save(SGLANG_METADATA_CLASS)
            self.write(pickle.STACK_GLOBAL)
            self.save(())
            self.write(pickle.NEWOBJ)
            self.memoize(obj)
            self.save(dict(obj.__dict__))
            self.write(pickle.BUILD)
            return
        super().save(obj, save_persistent_id)


def serialize_payload(buf: torch.Tensor, metadata: Sequence[FlattenedTensorMetadata]) -> str:
    """One `serialized_named_tensors` entry (base64 str) for `/update_weights_from_tensor`.

    A CUDA `buf` travels as a CUDA IPC handle naming its GPU by UUID (`reduce_tensor_by_device_uuid`;
    the receiver maps the same memory: keep `buf` alive until the request returns). A CPU `buf` travels
    by value: shared-memory file descriptors would need the multiprocessing authkey, which an unrelated
    server process does not have. The pickle is the one sglang's MultiprocessingSerializer writes
    (ForkingPickler reducers, base64), with its metadata class named.
    """
    stream = io.BytesIO()
    _SGLangNamePickler(stream, share_memory=buf.is_cuda).dump({"flattened_tensor": buf, "metadata": list(metadata)})
    return base64.b64encode(stream.getvalue()).decode("ascii")


def device_index_of_uuid(uuid: str) -> int:
    import torch

    for index in range(torch.cuda.device_count()):
        if device_uuid(index) == uuid:
            return index
    raise ValueError(f"flattened bucket payload: no visible CUDA device has uuid {uuid} (another node's GPU?)")


def rebuild_cuda_tensor_from_uuid(*args):
    """The receiving half of `reduce_tensor_by_device_uuid`: the UUID back to this process's device index."""
    from torch.multiprocessing import reductions

    device = args[_REBUILD_CUDA_DEVICE_ARG]
    if isinstance(device, str):
        args = (*args[:_REBUILD_CUDA_DEVICE_ARG], device_index_of_uuid(device), *args[_REBUILD_CUDA_DEVICE_ARG + 1:])
    return reductions.rebuild_cuda_tensor(*args)


class _StrictUnpickler(pickle.Unpickler):
    """SGLang's allowlist, with its metadata class resolved to ours (sglang is not installed on CPU)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DENIED:
            raise pickle.UnpicklingError(f"flattened bucket payload: blocked {module}.{name}")
        if module == SGLANG_METADATA_MODULE and name == SGLANG_METADATA_CLASS:
            return FlattenedTensorMetadata
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return rebuild_cuda_tensor_from_uuid  # what SGLang's patched reductions do
        if not (module + ".").startswith(SGLANG_ALLOWED_MODULE_PREFIXES):
            raise pickle.UnpicklingError(f"flattened bucket payload: {module}.{name} is not in SGLang's allowlist")
        return super().find_class(module, name)


def load_payload(payload: str) -> List[Tuple[str, torch.Tensor]]:
    """Receiving side of one payload: base64 -> allowlisted unpickle -> [(name, tensor)] (views)."""
    try:
        data = base64.b64decode(payload, validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"flattened bucket payload: not valid base64 ({exc})") from None
    obj = _StrictUnpickler(io.BytesIO(data)).load()
    if not isinstance(obj, dict) or set(obj) != {"flattened_tensor", "metadata"}:
        raise ValueError("flattened bucket payload: expected a dict with keys flattened_tensor and metadata")
    return reconstruct_tensors(obj["flattened_tensor"], obj["metadata"])
