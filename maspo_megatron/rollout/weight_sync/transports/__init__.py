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
    """`auto` -> the engine's own default (rollout/registry.py: local for the in-process engine; tensor
    with CUDA, disk without, for SGLang)."""
    import torch

    from maspo_megatron.rollout.registry import default_transport

    if name == "auto":
        name = default_transport(engine_kind, torch.cuda.is_available())
    if name not in TRANSPORTS:
        raise WeightSyncError(f"weight_sync.transport: {name!r} is not one of {sorted(TRANSPORTS)}")
    return name


__all__ = ["TRANSPORTS", "DiskTransport", "DistributedTransport", "LocalTransport", "TensorTransport", "Transport",
           "WeightSyncError", "register_transport", "resolve_transport_name"]
