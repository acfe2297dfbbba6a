"""The ONE device decision of a process: which device it computes on, which backends its groups use.

    device = select_device(local_rank)          # cuda:<local_rank % gpus> with CUDA, else cpu
    backend = process_group_backend("auto", device)

On a GPU node the default process group is `"cpu:gloo,cuda:nccl"`: collectives on CUDA tensors
go over NCCL, and the small CPU control tensors (the stop flag, the finite-gradient vote, sample
hand-off headers) stay legal over gloo without a device round trip. Without CUDA every group is
gloo and the CPU edge (`parallel/cpu/`, Megatron-Core on gloo) is installed; nothing above this
module asks which of the two it got: it asks `ParallelDims.device`.

To pin a process to the CPU on a machine that has GPUs (multi-process CPU tests on a one-GPU
machine, where NCCL refuses two ranks on one device), hide the GPUs before torch initialises
CUDA: `CUDA_VISIBLE_DEVICES=""`.
"""
from __future__ import annotations

import torch

# parallel.backend -> torch.distributed backend string, per device type.
_BACKENDS = {
    ("auto", "cuda"): "cpu:gloo,cuda:nccl",
    ("nccl", "cuda"): "cpu:gloo,cuda:nccl",
    ("gloo", "cuda"): "gloo",
    ("auto", "cpu"): "gloo",
    ("gloo", "cpu"): "gloo",
}


def select_device(local_rank: int) -> torch.device:
    """This process's compute device; with CUDA also makes it the current device."""
    if not torch.cuda.is_available():
        from maspo_megatron.parallel.cpu import enable_cpu_shim

        enable_cpu_shim()
        return torch.device("cpu")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def process_group_backend(choice: str, device: torch.device) -> str:
    """The init_process_group backend for `parallel.backend` on this device (ValueError naming the key)."""
    backend = _BACKENDS.get((choice, device.type))
    if backend is None:
        raise ValueError(f"parallel.backend: {choice!r} needs CUDA on this process; use 'gloo' or 'auto'")
    return backend
