"""What a weight transport may ask of the rollout engine on the driver: the receiving side, in bytes and
names only. The engine builds its own request bodies (SGLang: rollout/sglang/protocol.py); transports
never see them. `SGLangEngine` implements all of it; the CPU engine has its own (`load_hf_state_dict`).

    receiver_tp_sizes                       {server: TP ranks}: one payload / group rank per TP rank
    ipc_routes({(node, gpu): rank}) -> {server: [trainer rank per TP rank]}   whose copy each TP rank maps
    accepts_mixed_dtype_buckets             False: one flattened bucket per dtype
    begin_weight_update() -> bool           open the update session (False: the server predates it)
    end_weight_update()
    load_serialized_buckets({server: [payload per TP rank]}, version, load_format)      tensor
    broadcast_group_size() -> int           1 (the source) + every receiving rank            distributed
    init_broadcast_group(name, address, port, backend)
    load_broadcast_bucket(name, names, dtypes, shapes, version)   blocks until received
    destroy_broadcast_group(name)
    load_from_disk(directory, version)                                                    disk
    check_weight_readback(probe_name)        raises when verify_weights cannot work (start-up)
"""
from __future__ import annotations

from typing import List, Mapping, Protocol, Sequence, Tuple, runtime_checkable


@runtime_checkable
class WeightReceiver(Protocol):
    @property
    def receiver_tp_sizes(self) -> Mapping[str, int]: ...

    def ipc_routes(self, rank_of_gpu: Mapping[Tuple[int, int], int]) -> Mapping[str, List[int]]: ...

    @property
    def accepts_mixed_dtype_buckets(self) -> bool: ...

    def begin_weight_update(self) -> bool: ...

    def end_weight_update(self) -> None: ...

    def load_serialized_buckets(self, payloads: Mapping[str, Sequence[str]], weight_version: int,
                                load_format: str) -> None: ...

    def broadcast_group_size(self) -> int: ...

    def init_broadcast_group(self, group_name: str, master_address: str, master_port: int, backend: str) -> None: ...

    def load_broadcast_bucket(self, group_name: str, names: Sequence[str], dtypes: Sequence[str],
                              shapes: Sequence[Sequence[int]], weight_version: int) -> None: ...

    def destroy_broadcast_group(self, group_name: str) -> None: ...

    def load_from_disk(self, model_path: str, weight_version: int) -> None: ...

    def check_weight_readback(self, probe_name: str) -> None: ...


def require_receiver(engine, transport: str, methods: Sequence[str] = ()) -> None:
    """A one-line error when the engine on the driver cannot receive this transport's updates
    (`methods`: the receiver members this transport uses; default: the whole interface)."""
    from maspo_megatron.rollout.weight_sync.transports.base import WeightSyncError

    if not (all(hasattr(engine, m) for m in methods) if methods else isinstance(engine, WeightReceiver)):
        raise WeightSyncError(f"weight_sync.transport: {transport!r} needs SGLang servers (rollout.engine=sglang), "
                              f"got {type(engine).__name__}")
