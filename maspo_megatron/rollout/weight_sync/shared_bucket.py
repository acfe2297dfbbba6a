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
"""
from __future__ import annotations

import os
import socket
import uuid
from typing import Iterable

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


class SharedBucket:
    """uint8[nbytes] in /dev/shm, the same pages on every rank of the TP group (`tensor`)."""

    def __init__(self, tensor: torch.Tensor, dims) -> None:
        self.tensor = tensor
        self.nbytes = tensor.numel()
        self.group = dims.tp_group

    @classmethod
    def open(cls, nbytes: int, dims) -> SharedBucket:
        """Collective over the TP group; every rank must pass the same nbytes."""
        group = dims.tp_group
        source = dist.get_global_rank(group, 0)
        token = [uuid.uuid4().hex if dims.tp_rank == 0 else None]
        dist.broadcast_object_list(token, src=source, group=group)
        path = f"/dev/shm/maspo_wsb_{token[0]}"
        nbytes = max(int(nbytes), 1)
        if dims.tp_rank == 0:  # creates the file; writing zeros allocates the shared pages once
            tensor = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
            tensor.zero_()
        dist.barrier(group=group)
        if dims.tp_rank != 0:
            tensor = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
            tensor.zero_()  # maps every page in this process too (still all zeros: nothing written yet)
        dist.barrier(group=group)
        if dims.tp_rank == 0:  # every rank has mapped it: the name is no longer needed (no leak on a crash)
            os.unlink(path)
        return cls(tensor, dims)

    def barrier(self) -> None:
        """All TP ranks are done writing a bucket, or the source's consumer is done reading one."""
        dist.barrier(group=self.group)

    def close(self) -> None:
        self.tensor = None
