"""`distributed`: one NCCL (gloo on CPU) group per pipeline stage with the engines; broadcast buckets.

Group of stage p: rank 0 = that stage's export source, ranks 1.. = every SGLang TP rank of every
server (`rank_offset = 1 + server_index * tp_size`), rendezvous at the source's address through
`/init_weights_update_group` (TCPStore + PrefixStore(group_name), as SGLang builds it). Per bucket
rank 0 posts `/update_weights_from_distributed` (names, dtypes, shapes) for the stage while the
source broadcasts each tensor in `names` order; stages run concurrently on their own groups. Groups
are made on the first sync and kept until `close()`.
"""
from __future__ import annotations

import datetime
import socket
import threading
from typing import List, Optional

import torch
import torch.distributed as dist

from maspo_megatron.rollout.weight_sync.bucketing import NamedTensor
from maspo_megatron.rollout.weight_sync.hf_stream import is_export_source
from maspo_megatron.rollout.weight_sync.transports.base import Transport, WeightSyncError, check_response


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (SGLang resolves it with getattr(torch, name))."""
    return str(dtype).replace("torch.", "")


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
        self.group_name = f"maspo_weight_sync_pp{dims.pp_rank}"
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"

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
        if dist.get_rank() == 0 and not hasattr(self.engine, "init_weights_update_group"):
            raise WeightSyncError("weight_sync.transport: 'distributed' needs SGLang servers (rollout.engine=sglang)")
        host = self.cfg.master_address
        port = _free_port(host)
        rendezvous = self._sources_exchange((host, port, self.group_name))
        tp_size = int(getattr(self.engine.cfg, "tp_size", 1)) if self.engine is not None else 0
        urls = list(self.engine.worker_urls) if self.engine is not None else []
        world_size = [1 + tp_size * len(urls)]
        if self.dims.pp > 1:
            dist.broadcast_object_list(world_size, src=0, group=self.dims.pp_group)
        background = None
        if dist.get_rank() == 0:
            def init_all() -> None:
                for stage_host, stage_port, name in rendezvous:
                    payloads = {url: {"master_address": stage_host, "master_port": stage_port,
                                      "rank_offset": 1 + index * tp_size, "world_size": world_size[0],
                                      "group_name": name, "backend": self.backend}
                                for index, url in enumerate(urls)}
                    check_response(self.engine.init_weights_update_group(payloads), "init_weights_update_group")
            background = _Background(init_all)
        timeout = datetime.timedelta(seconds=self.cfg.group_timeout_s)
        store = dist.TCPStore(host, port, world_size[0], is_master=True, timeout=timeout)
        prefixed = dist.PrefixStore(self.group_name, store)
        if self.backend == "gloo":  # the timeout bounds a broadcast whose receiver died
            self.group = dist.ProcessGroupGloo(prefixed, 0, world_size[0], timeout)
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefixed, 0, world_size[0], options)
        self._store = store
        if background is not None:
            background.join()
        self._barrier()

    def _round(self, bucket: Optional[List[NamedTensor]], version: int) -> bool:
        header = None if bucket is None else {
            "names": [n for n, _ in bucket], "dtypes": [dtype_name(t.dtype) for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket]}
        headers = self._sources_exchange(header)
        background = None
        all_done = [False]
        if dist.get_rank() == 0:
            all_done[0] = all(h is None for h in headers)

            def post_all() -> None:
                for stage, stage_header in enumerate(headers):
                    if stage_header is None:
                        continue
                    body = dict(stage_header, group_name=f"maspo_weight_sync_pp{stage}", flush_cache=False,
                                weight_version=str(version))
                    check_response(self.engine.update_weights_from_distributed(body), "update_weights_from_distributed")
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
                self.engine.post("/destroy_weights_update_group", {"group_name": f"maspo_weight_sync_pp{stage}"})
        self.group = None
