"""Gather a TP-sharded parameter to the TP source rank: collectives, or shared memory on one CPU host.

`TPGatherer(params, dims)` is opened once per sync by every rank of a TP group. With CUDA tensors
(or ranks on different hosts) each parameter is one `gather` over the TP group (NCCL on GPUs). When
the TP group's ranks are CPU processes of one host, gloo would push every shard through loopback
TCP (~1 GB/s); instead each non-source rank copies its shard into a /dev/shm staging buffer that the
source has mapped, and the source copies it from there into the full tensor (two memcpys). Two
staging buffers alternate, so one TP barrier per parameter keeps writer and reader in step: rank r
writes parameter i into buffer i % 2 only after the barrier of parameter i - 1, which the source
enters after it has read parameter i - 2 from that buffer.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from maspo_megatron.models import layouts
from maspo_megatron.rollout.weight_sync.shared_bucket import map_shared_files, one_cpu_host


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class TPGatherer:
    """Use as a context manager on every rank of the TP group; `gather_full` once per parameter, in the same order."""

    def __init__(self, params: Iterable[torch.Tensor], dims, use_shared_memory: Optional[bool] = None) -> None:
        self.dims = dims
        self.group = dims.tp_group if dims.tp > 1 else None
        self.source = dist.get_global_rank(self.group, 0) if self.group is not None else dist.get_rank()
        self._staging: list = []  # [buffer 0, buffer 1] of this rank (writer) or [[peer bufs] x 2] (source)
        self._count = 0
        params = list(params)
        if use_shared_memory is None:
            use_shared_memory = self._one_cpu_host(params)
        self.shared = bool(use_shared_memory) and self.group is not None
        if self.shared:
            self._open_staging(max((_nbytes(p) for p in params), default=0))

    def _one_cpu_host(self, params: list) -> bool:
        return self.group is not None and one_cpu_host(params, self.dims)

    def _open_staging(self, nbytes: int) -> None:
        """Each peer creates its two staging files; the source maps them all (pages left untouched)."""
        rank, tp = self.dims.tp_rank, self.dims.tp
        if rank != 0:
            own = map_shared_files(self.dims, nbytes, create=[f"{rank}_{s}" for s in (0, 1)], attach=[], touch=False)
            self._staging = [own[f"{rank}_{s}"] for s in (0, 1)]
        else:
            peers = map_shared_files(self.dims, nbytes, create=[],
                                     attach=[f"{r}_{s}" for r in range(1, tp) for s in (0, 1)], touch=False)
            self._staging = [[peers[f"{r}_{s}"] for r in range(1, tp)] for s in (0, 1)]

    def close(self) -> None:
        self._staging = []

    def __enter__(self) -> TPGatherer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def gather_full(self, param: torch.Tensor, dim: Optional[int], glu: bool) -> Optional[torch.Tensor]:
        """The full Megatron tensor on the TP source rank, None on the others (dim None: replicated)."""
        if dim is None or self.group is None:
            return param.detach() if self.dims.tp_rank == 0 else None
        shard = param.detach().contiguous()
        if self.shared:
            return self._gather_shared(shard, dim, glu)
        if dim == 0 and not glu:  # gather straight into views of the full tensor: no concatenation copy
            if self.dims.tp_rank != 0:
                dist.gather(shard, None, dst=self.source, group=self.group)
                return None
            full = shard.new_empty((shard.shape[0] * self.dims.tp, *shard.shape[1:]))
            dist.gather(shard, list(full.chunk(self.dims.tp, dim=0)), dst=self.source, group=self.group)
            return full
        if self.dims.tp_rank != 0:
            dist.gather(shard, None, dst=self.source, group=self.group)
            return None
        parts = [torch.empty_like(shard) for _ in range(self.dims.tp)]
        dist.gather(shard, parts, dst=self.source, group=self.group)
        return layouts.gather_tp(parts, dim, glu)

    def gather_shards(self, param: torch.Tensor, dim: Optional[int]) -> Optional[list]:
        """The TP shards of `param` in TP-rank order on the source rank (None on the others), NOT assembled:
        the caller scatters them straight into their destination (bucket_writer.py), so the full tensor
        is never materialised. dim None (replicated) or no TP group: [param].

        Lifetime: on one CPU host the peers' shards are views of the /dev/shm staging buffers; they stay
        valid until the next-but-one `gather_shards` / `gather_full` call (two alternating slots).
        """
        if dim is None or self.group is None:
            return [param.detach()] if self.dims.tp_rank == 0 else None
        shard = param.detach().contiguous()
        if self.shared:
            peers = self._stage_shared(shard)
            return None if peers is None else [shard, *peers]
        if self.dims.tp_rank != 0:
            dist.gather(shard, None, dst=self.source, group=self.group)
            return None
        parts = [torch.empty_like(shard) for _ in range(self.dims.tp)]
        dist.gather(shard, parts, dst=self.source, group=self.group)
        return parts

    def _stage_shared(self, shard: torch.Tensor) -> Optional[list]:
        """Peers copy their shard into the shared staging slot; the source gets views of them (else None)."""
        slot = self._count % 2
        self._count += 1
        nbytes = _nbytes(shard)
        if self.dims.tp_rank != 0:
            self._staging[slot][:nbytes].copy_(shard.reshape(-1).view(torch.uint8))
            dist.barrier(group=self.group)
            return None
        dist.barrier(group=self.group)
        return [buf[:nbytes].view(shard.dtype).view(shard.shape) for buf in self._staging[slot]]

    def _gather_shared(self, shard: torch.Tensor, dim: int, glu: bool) -> Optional[torch.Tensor]:
        peers = self._stage_shared(shard)
        if peers is None:
            return None
        if dim == 0 and not glu:
            full = shard.new_empty((shard.shape[0] * self.dims.tp, *shard.shape[1:]))
            for part, piece in zip(full.chunk(self.dims.tp, dim=0), [shard, *peers], strict=True):
                part.copy_(piece)
            return full
        return layouts.gather_tp([shard, *peers], dim, glu)
