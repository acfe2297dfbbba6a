"""Weight transports by name (`weight_sync.transport`); one class each over the shared HF-tensor stream."""
from __future__ import annotations

from maspo_megatron.rollout.weight_sync.transports.base import Transport, WeightSyncError
from maspo_megatron.rollout.weight_sync.transports.disk import DiskTransport
from maspo_megatron.rollout.weight_sync.transports.distributed import DistributedTransport
from maspo_megatron.rollout.weight_sync.transports.local import LocalTransport
from maspo_megatron.rollout.weight_sync.transports.tensor import TensorTransport

TRANSPORTS = {cls.name: cls for cls in (LocalTransport, DiskTransport, TensorTransport, DistributedTransport)}


def register_transport(cls: type) -> None:
    TRANSPORTS[cls.name] = cls


def resolve_transport_name(name: str, engine_kind: str) -> str:
    """`auto` -> local for the in-process engine, tensor (colocated, CUDA) or disk for SGLang."""
    import torch

    if name != "auto":
        if name not in TRANSPORTS:
            raise WeightSyncError(f"weight_sync.transport: {name!r} is not one of {sorted(TRANSPORTS)}")
        return name
    if engine_kind == "local":
        return "local"
    return "tensor" if torch.cuda.is_available() else "disk"


__all__ = ["TRANSPORTS", "DiskTransport", "DistributedTransport", "LocalTransport", "TensorTransport", "Transport",
           "WeightSyncError", "register_transport", "resolve_transport_name"]
