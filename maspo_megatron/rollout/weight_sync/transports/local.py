"""`local`: in-memory into the in-process engine on global rank 0 (CPU, or the driver's GPU).

Stage 0's source (rank 0 itself) loads its buckets directly; every other stage's source ships each
bucket as one flattened uint8 buffer point-to-point (on the ranks' device: NCCL between GPUs, gloo
on the CPU), and rank 0 loads them in stage order after its own. A sender holds at most its current bucket and that bucket's buffer.
"""
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist

from maspo_megatron.rollout.weight_sync.bucketing import NamedTensor
from maspo_megatron.rollout.weight_sync.flattened_bucket import flatten_tensors, reconstruct_tensors
from maspo_megatron.rollout.weight_sync.hf_stream import is_export_source
from maspo_megatron.rollout.weight_sync.transports.base import Transport, WeightSyncError, stage_sources


class LocalTransport(Transport):
    name = "local"

    def prepare(self, version: int) -> None:
        if dist.get_rank() == 0 and not hasattr(self.engine, "load_hf_state_dict"):
            raise WeightSyncError("weight_sync.transport: 'local' needs the in-process engine (rollout.engine=local) "
                                  f"on rank 0, got {type(self.engine).__name__}")

    def send(self, bucket: List[NamedTensor], version: int) -> None:
        if dist.get_rank() == 0:
            self.engine.load_hf_state_dict(dict(bucket))
            return
        buf, metadata = flatten_tensors(bucket, release=True)
        dist.send_object_list([metadata], dst=0)
        dist.send(buf, dst=0)

    def finish(self, version: int) -> None:
        if not is_export_source(self.dims) or self.dims.pp == 1:
            return
        if dist.get_rank() != 0:
            dist.send_object_list([None], dst=0)  # end of this stage's buckets
            return
        for source in stage_sources(self.dims)[1:]:
            while True:
                holder = [None]
                dist.recv_object_list(holder, src=source)
                if holder[0] is None:
                    break
                metadata = holder[0]
                buf = torch.empty(metadata[-1].end_idx, dtype=torch.uint8, device=self.dims.device)
                dist.recv(buf, src=source)
                self.engine.load_hf_state_dict(dict(reconstruct_tensors(buf, metadata)))
                del buf
