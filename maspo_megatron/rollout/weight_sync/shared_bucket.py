"""A bucket buffer in /dev/shm, mapped by every rank of a TP group on one CPU host.

On the export fast path (bucket_writer.py) the TP ranks of a pipeline stage are, on a CPU host,
processes of one machine: instead of moving every peer shard to the source (gloo's loopback TCP, or a
/dev/shm staging copy plus a second copy into the bucket), the bucket itself is shared memory and
each rank writes only its own shard into its rows of the HF tensors. Each byte is copied once, by the
rank that owns it, and the TP ranks copy in parallel.

`SharedBucket.open(nbytes, dims)` is a collective over the stage's TP group: the source (tp_rank 0)
creates the file under a random name, every rank maps it and touches every page (so page faults
stay out of the export; the mapping is kept across syncs like `BucketBuffers(keep=True)`), and once
all have mapped it the name is unlinked: the memory goes away with the last process that maps it,
also on a crash. Memory: `nbytes` of shared pages for the whole TP group. Each rank's RSS counts the
pages it touched (all of them), its Pss the share 1/tp.

`map_shared_files` is that create / map / unlink protocol for any set of files; tp_gather.py's
staging buffers (the general path) use it too.
"""
from __future__ import annotations

import os
import socket
import uuid
from typing import Dict, Iterable, Sequence

import torch
import torch.distributed as dist


def one_cpu_host(params: Iterable[torch.Tensor], dims) -> bool:
    """True when every rank of this rank's TP group (tp > 1) is a CPU process on this host.

    A collective over the TP group (hostnames are exchanged): call it on every rank of the group."""
    if dims.tp <= 1 or any(p.is_cuda for p in params):
        return False
    hosts = [None] * dims.tp
    dist.all_gather_object(hosts, socket.gethostname(), group=dims.tp_group)
    return len(set(hosts)) == 1


def map_shared_files(dims, nbytes: int, create: Sequence[str], attach: Sequence[str], touch: bool) -> Dict[str, torch.Tensor]:
    """Collective over the TP group: uint8[nbytes] files in /dev/shm shared between its ranks.

    This rank creates the files keyed `create`; once every rank has created its own, it maps those
    keyed `attach` (created by other ranks); once every rank has mapped what it needs, the creators
    unlink the names, so the memory goes away with the last process that maps it, also on a crash.
    touch: write zeros through every mapping, so page faults stay out of the copies that follow.
    Returns {key: tensor} for the keys of `create` and `attach`.
    """
    group = dims.tp_group
    token = [uuid.uuid4().hex if dims.tp_rank == 0 else None]
    dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0), group=group)
    nbytes = max(int(nbytes), 1)

    def path(key: str) -> str:
        return f"/dev/shm/maspo_ws_{token[0]}_{key}"

    def mapped(key: str) -> torch.Tensor:
        tensor = torch.from_file(path(key), shared=True, size=nbytes, dtype=torch.uint8)
        if touch:
            tensor.zero_()
        return tensor

    tensors = {key: mapped(key) for key in create}
    dist.barrier(group=group)
    tensors.update({key: mapped(key) for key in attach})
    dist.barrier(group=group)
    for key in create:
        os.unlink(path(key))
    return tensors


class SharedBucket:
    """uint8[nbytes] in /dev/shm, the same pages on every rank of the TP group (`tensor`)."""

    def __init__(self, tensor: torch.Tensor, dims) -> None:
        self.tensor = tensor
        self.nbytes = tensor.numel()
        self.group = dims.tp_group

    @classmethod
    def open(cls, nbytes: int, dims) -> SharedBucket:
        """Collective over the TP group; every rank must pass the same nbytes. The source creates the
        file, every rank maps it and touches every page (still all zeros: nothing written yet)."""
        source = dims.tp_rank == 0
        tensors = map_shared_files(dims, nbytes, create=["bucket"] if source else [],
                                   attach=[] if source else ["bucket"], touch=True)
        return cls(tensors["bucket"], dims)

    def barrier(self) -> None:
        """All TP ranks are done writing a bucket, or the source's consumer is done reading one."""
        dist.barrier(group=self.group)

    def close(self) -> None:
        self.tensor = None
