"""`disk`: sharded safetensors in a shared directory + `/update_weights_from_disk`.

Each pipeline stage's source writes its buckets as `model-pp<stage>-<n>.safetensors` into
`<weight_sync.disk_dir>/v<version>/`; rank 0 writes `model.safetensors.index.json` and asks every
server to load the directory. The previous version's directory is removed after a successful load.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import List

import torch.distributed as dist

from maspo_megatron.rollout.weight_sync.bucketing import NamedTensor, bucket_nbytes
from maspo_megatron.rollout.weight_sync.receiver import require_receiver
from maspo_megatron.rollout.weight_sync.transports.base import Transport, WeightSyncError


def version_dir(root: str, version: int) -> str:
    return os.path.join(root, f"v{version:08d}")


class DiskTransport(Transport):
    name = "disk"

    def __init__(self, cfg, dims, engine=None) -> None:
        super().__init__(cfg, dims, engine)
        if not cfg.disk_dir:
            raise WeightSyncError("weight_sync.disk_dir: required for transport 'disk' (a directory every rank and "
                                  "every server can read)")
        self._weight_map: dict = {}
        self._total_bytes = 0
        self._shard_index = 0
        self._previous_dir = None

    def receiver_error(self):
        if not hasattr(self.engine, "load_from_disk"):
            return "weight_sync.transport: 'disk' needs SGLang servers (rollout.engine=sglang)"
        return None

    def prepare(self, version: int) -> None:
        if dist.get_rank() == 0:
            require_receiver(self.engine, "disk")
            path = version_dir(self.cfg.disk_dir, version)
            shutil.rmtree(path, ignore_errors=True)
            os.makedirs(path)
        self._weight_map, self._total_bytes, self._shard_index = {}, 0, 0

    def send(self, bucket: List[NamedTensor], version: int) -> None:
        from safetensors.torch import save_file

        path = version_dir(self.cfg.disk_dir, version)
        os.makedirs(path, exist_ok=True)  # rank 0 may not have created it yet on a slow shared filesystem
        file_name = f"model-pp{self.dims.pp_rank:03d}-{self._shard_index:05d}.safetensors"
        self._shard_index += 1
        save_file({name: tensor.contiguous() for name, tensor in bucket}, os.path.join(path, file_name),
                  metadata={"format": "pt"})
        self._weight_map.update({name: file_name for name, _ in bucket})
        self._total_bytes += bucket_nbytes(bucket)

    def finish(self, version: int) -> None:
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object((self._weight_map, self._total_bytes), parts, dst=0)
        if dist.get_rank() != 0:
            return
        weight_map, total_bytes = {}, 0
        for part_map, part_bytes in parts:
            weight_map.update(part_map)
            total_bytes += part_bytes
        path = version_dir(self.cfg.disk_dir, version)
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as handle:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, handle)
        self.engine.load_from_disk(path, version)
        if self._previous_dir and self._previous_dir != path:
            shutil.rmtree(self._previous_dir, ignore_errors=True)
        self._previous_dir = path
