"""`distributed`: one NCCL (gloo on CPU) group per pipeline stage with the engines; broadcast buckets.

Group of stage p: rank 0 = that stage's export source, ranks 1.. = every SGLang TP rank of every
server (`rank_offset = 1 + server_index * tp_size`), rendezvous at the source's OWN address (its
node: `source_address`) through `/init_weights_update_group`. NCCL cannot put two ranks of one group
on a GPU, so this transport refuses servers that share the trainer's GPUs (colocated) on CUDA, and
servers with `dp_size > 1` (their ranks are not `rank_offset + tp_rank`). Both sides build the group the way SGLang's `init_custom_process_group`
does (TCPStore at tcp://address:port, PrefixStore(group_name), torch's `_new_process_group_helper`,
which adds its own "<group_name>/" and "<device>/" prefixes), so the store keys meet. Per bucket
rank 0 posts `/update_weights_from_distributed` (names, dtypes, shapes) for the stage while the
source broadcasts each tensor in `names` order; stages run concurrently on their own groups. Groups
are made on the first sync and kept until `close()`.
"""
from __future__ import annotations

import datetime
import inspect
import os
import socket
import threading
from typing import List, Optional

import torch
import torch.distributed as dist

from maspo_megatron.rollout.weight_sync.bucketing import NamedTensor
from maspo_megatron.rollout.weight_sync.hf_stream import is_export_source
from maspo_megatron.rollout.weight_sync.receiver import require_receiver
from maspo_megatron.rollout.weight_sync.transports.base import Transport
from maspo_megatron.utils.ports import free_port

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def node_name() -> str:
    """This process's node as the rollout nodes reach it: Slurm's name for it (`SLURMD_NODENAME`, the name
    `scontrol show hostnames` and sglang_node.sh use), else the hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def source_address(master_address: str, this_node: Optional[str] = None) -> str:
    """Where a stage's source binds its TCPStore and what it advertises to the servers. Loopback when the
    job is on one node (`weight_sync.master_address` loopback); otherwise the source's OWN node (stage p's
    source may be on any training node; binding there to stage 0's host fails with EADDRNOTAVAIL), except
    that the node named by master_address keeps that address (it may name a particular interface)."""
    if master_address in LOOPBACK:
        return master_address
    this_node = this_node or node_name()
    return master_address if this_node.split(".")[0] == master_address.split(".")[0] else this_node


def group_name(stage: int) -> str:
    """The weight-broadcast group of pipeline stage `stage`."""
    return f"maspo_weight_sync_pp{stage}"


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (SGLang resolves it with getattr(torch, name))."""
    return str(dtype).replace("torch.", "")


def new_custom_group(host: str, port: int, world_size: int, group_name: str, backend: str,
                     timeout: datetime.timedelta):
    """This process as rank 0 (and store master) of a group outside the default world, built exactly
    like SGLang's `init_custom_process_group` builds the other ranks' side."""
    from torch.distributed import distributed_c10d as c10d

    store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout)
    prefixed = dist.PrefixStore(group_name, store)
    options = "backend_options" if "backend_options" in inspect.signature(c10d._new_process_group_helper).parameters \
        else "pg_options"
    group, _ = c10d._new_process_group_helper(world_size, 0, [], c10d.Backend(backend), prefixed,
                                              group_name=group_name, timeout=timeout, **{options: None})
    c10d._world.pg_group_ranks[group] = {rank: rank for rank in range(world_size)}
    return group, store


class _Background:
    """Runs rank 0's blocking HTTP calls while this process takes part in the collective."""

    def __init__(self, fn) -> None:
        self.error: Optional[BaseException] = None

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # re-raised in join()
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True, name="weight-sync-http")
        self.thread.start()

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


class DistributedTransport(Transport):
    name = "distributed"

    def __init__(self, cfg, dims, engine=None) -> None:
        super().__init__(cfg, dims, engine)
        self.group = None  # this source's group with the engines
        self.group_name = group_name(dims.pp_rank)
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"

    def receiver_error(self) -> Optional[str]:
        """Rank 0, at start-up: why the engine cannot take NCCL broadcasts, or None."""
        if not hasattr(self.engine, "broadcast_group_size"):
            return "weight_sync.transport: 'distributed' needs SGLang servers (rollout.engine=sglang)"
        if getattr(self.engine, "data_parallel_size", 1) > 1:
            return ("weight_sync.transport: 'distributed' does not support rollout.sglang.dp_size > 1 (its ranks are not "
                    "rank_offset + tp_rank): use dp_size 1 and more servers (rollout.sglang.num_servers)")
        if self.backend == "nccl" and getattr(self.engine, "shares_trainer_gpus", False):
            return ("weight_sync.transport: 'distributed' cannot reach servers on the trainer's own GPUs (NCCL refuses two "
                    "ranks of a group on one GPU): use 'tensor' when colocated, or rollout.sglang.urls on other nodes")
        return None

    def _sources_exchange(self, item):
        """gather_object over the stage sources -> list on rank 0 (None elsewhere)."""
        if self.dims.pp == 1:
            return [item]
        items = [None] * self.dims.pp if dist.get_rank() == 0 else None
        dist.gather_object(item, items, dst=0, group=self.dims.pp_group)
        return items

    def _barrier(self) -> None:
        if self.dims.pp > 1:
            dist.barrier(group=self.dims.pp_group)

    def prepare(self, version: int) -> None:
        if self.group is not None or not is_export_source(self.dims):
            return
        if dist.get_rank() == 0:
            require_receiver(self.engine, "distributed")
        host = source_address(self.cfg.master_address)
        port = free_port(host)
        rendezvous = self._sources_exchange((host, port, self.group_name))
        world_size = [self.engine.broadcast_group_size() if self.engine is not None else 0]
        if self.dims.pp > 1:
            dist.broadcast_object_list(world_size, src=0, group=self.dims.pp_group)
        background = None
        if dist.get_rank() == 0:
            def init_all() -> None:
                for stage_host, stage_port, name in rendezvous:
                    self.engine.init_broadcast_group(name, stage_host, stage_port, self.backend)
            background = _Background(init_all)
        # the timeout also bounds a broadcast whose receiver died
        timeout = datetime.timedelta(seconds=self.cfg.group_timeout_s)
        self.group, self._store = new_custom_group(host, port, world_size[0], self.group_name, self.backend, timeout)
        if background is not None:
            background.join()
        self._barrier()

    def _round(self, bucket: Optional[List[NamedTensor]], version: int) -> bool:
        # (names, dtypes, shapes) of the tensors this source broadcasts next, in order
        header = None if bucket is None else (
            [n for n, _ in bucket], [dtype_name(t.dtype) for _, t in bucket], [list(t.shape) for _, t in bucket])
        headers = self._sources_exchange(header)
        background = None
        all_done = [False]
        if dist.get_rank() == 0:
            all_done[0] = all(h is None for h in headers)

            def post_all() -> None:
                for stage, stage_header in enumerate(headers):
                    if stage_header is None:
                        continue
                    self.engine.load_broadcast_bucket(group_name(stage), *stage_header, version)
            background = _Background(post_all)
        if bucket is not None:
            for _, tensor in bucket:
                self.group.broadcast(tensor.contiguous(), 0).wait()
        if background is not None:
            background.join()
        if self.dims.pp > 1:
            dist.broadcast_object_list(all_done, src=0, group=self.dims.pp_group)
        return all_done[0]

    def send(self, bucket: List[NamedTensor], version: int) -> None:
        self._round(bucket, version)

    def finish(self, version: int) -> None:
        if not is_export_source(self.dims):
            return
        while not self._round(None, version):
            pass

    def close(self) -> None:
        if self.group is None:
            return
        if dist.get_rank() == 0:
            for stage in range(self.dims.pp):
                self.engine.destroy_broadcast_group(group_name(stage))
        dist.destroy_process_group(self.group)
        self.group = None
