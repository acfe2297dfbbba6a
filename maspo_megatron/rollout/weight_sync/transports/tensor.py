"""`tensor` (colocated): flattened buckets handed to SGLang by reference (`/update_weights_from_tensor`).

Each stage's source packs a bucket into a FRESH uint8 buffer (flattened_bucket.py) and serializes
it: a CUDA buffer travels as a CUDA IPC handle, a CPU buffer through shared memory. Sources meet
in rounds over the pipeline group: gather the payloads to rank 0, which posts them (one payload per
SGLang TP rank, `load_format: "flattened_bucket"`), then releases the round; a source keeps its
buffer alive until then, so the engine never reads freed memory. GPU: the engine's TP rank i maps
the buffer from the source's GPU, which needs peer access between the GPUs when they differ.
"""
from __future__ import annotations

from typing import List, Optional

import torch.distributed as dist

from maspo_megatron.rollout.weight_sync.bucketing import NamedTensor
from maspo_megatron.rollout.weight_sync.flattened_bucket import LOAD_FORMAT, flatten_tensors, serialize_payload
from maspo_megatron.rollout.weight_sync.hf_stream import is_export_source
from maspo_megatron.rollout.weight_sync.receiver import require_receiver
from maspo_megatron.rollout.weight_sync.transports.base import Transport


def split_by_dtype(bucket: List[NamedTensor]) -> List[List[NamedTensor]]:
    """One bucket per dtype, in order of first appearance (for servers whose bucket class takes one dtype)."""
    parts: dict = {}
    for name, tensor in bucket:
        parts.setdefault(tensor.dtype, []).append((name, tensor))
    return list(parts.values())


class TensorTransport(Transport):
    name = "tensor"

    def __init__(self, cfg, dims, engine=None) -> None:
        super().__init__(cfg, dims, engine)
        self._one_dtype_per_bucket: Optional[bool] = None

    def receiver_error(self) -> Optional[str]:
        if not hasattr(self.engine, "load_serialized_buckets"):
            return "weight_sync.transport: 'tensor' needs SGLang servers (rollout.engine=sglang)"
        return None

    def prepare(self, version: int) -> None:
        if dist.get_rank() == 0:
            require_receiver(self.engine, "tensor")
        if self._one_dtype_per_bucket is None:  # asked once: do the servers take mixed-dtype buckets?
            mixed = [bool(self.engine.accepts_mixed_dtype_buckets) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(mixed, src=0)
            self._one_dtype_per_bucket = not mixed[0]

    def _round(self, payload: Optional[str], version: int) -> bool:
        """One exchange among stage sources; returns True when every source has finished."""
        group = self.dims.pp_group if self.dims.pp > 1 else None
        items = [None] * self.dims.pp if dist.get_rank() == 0 else None
        if self.dims.pp > 1:
            dist.gather_object(payload, items, dst=0, group=group)
        else:
            items = [payload]
        all_done = [False]
        if dist.get_rank() == 0:
            for item in items:
                if item is not None:
                    self._post(item, version)
            all_done[0] = all(item is None for item in items)
        if self.dims.pp > 1:
            dist.broadcast_object_list(all_done, src=0, group=group)
        return all_done[0]

    def _post(self, payload: str, version: int) -> None:
        payloads = {url: [payload] * tp_size for url, tp_size in self.engine.receiver_tp_sizes.items()}
        self.engine.load_serialized_buckets(payloads, version, LOAD_FORMAT)

    def send(self, bucket: List[NamedTensor], version: int) -> None:
        for part in (split_by_dtype(bucket) if self._one_dtype_per_bucket else [bucket]):
            buf, metadata = flatten_tensors(part, release=True)  # bucket and buffer never both resident
            self._round(serialize_payload(buf, metadata), version)
            del buf  # released only after rank 0's request returned: the engine has copied the weights

    def finish(self, version: int) -> None:
        if not is_export_source(self.dims):
            return
        while not self._round(None, version):
            pass
