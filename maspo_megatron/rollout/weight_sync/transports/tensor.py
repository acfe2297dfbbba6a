"""`tensor` (colocated): flattened buckets handed to SGLang by reference (`/update_weights_from_tensor`).

CUDA IPC works only within a node, and each SGLang TP rank should map memory on the GPU it runs on
(slime's colocated design), so every TP rank of every server gets its payload from the trainer rank
on its own GPU of its own node: the route (`receiver.ipc_routes`, from the servers' launch plan and
an all-gather of where each trainer rank runs). One bucket travels like this:

    stage source: flatten the bucket into a fresh uint8 buffer (one per dtype for older servers)
    -> broadcast of that buffer to every route rank (NCCL across nodes on GPUs, gloo on the CPU)
    -> each route rank serializes ITS OWN copy (a CUDA IPC handle naming its GPU by UUID)
    -> the payloads are gathered to rank 0, which posts `serialized_named_tensors[i]` = the payload
       of route rank i of each server (it checks every payload came from the rank its route names)
    -> rank 0 broadcasts the outcome; only then are the copies freed (the engine has read them).

Every rank takes part in every round (a world collective): stage sources once per bucket in `send`,
their TP peers at the same bucket boundary (`peer_bucket`, called by the export stream), every other
rank (other replicas, CP ranks, stages with fewer buckets) in `finish` until no source has a bucket
left. A CPU buffer travels by value (there is no CPU SGLang; the stand-in decodes it).
"""
from __future__ import annotations

import socket
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from maspo_megatron.rollout.weight_sync.bucketing import NamedTensor
from maspo_megatron.rollout.weight_sync.flattened_bucket import LOAD_FORMAT, flatten_tensors, serialize_payload
from maspo_megatron.rollout.weight_sync.hf_stream import is_export_source
from maspo_megatron.rollout.weight_sync.receiver import require_receiver
from maspo_megatron.rollout.weight_sync.transports.base import Transport, WeightSyncError

RECEIVER_METHODS = ("ipc_routes", "load_serialized_buckets", "accepts_mixed_dtype_buckets")


def split_by_dtype(bucket: List[NamedTensor]) -> List[List[NamedTensor]]:
    """One bucket per dtype, in order of first appearance (for servers whose bucket class takes one dtype)."""
    parts: dict = {}
    for name, tensor in bucket:
        parts.setdefault(tensor.dtype, []).append((name, tensor))
    return list(parts.values())


def gather_rank_of_gpu(dims) -> Dict[Tuple[int, int], int]:
    """Collective: (node, node-local GPU id) -> trainer global rank, for every rank of the job.

    A node's index is the order of its first process (local_rank 0) among the nodes' first processes,
    the order in which the colocated fleet lists the nodes' servers (fleet.py). The GPU id is the
    rank's CUDA device index (every rank of a node sees the node's GPUs in the same numbering, as
    torchrun and `srun --gpu-bind=none` give); on the CPU the local rank stands in for it."""
    gpu = dims.device.index if dims.device.type == "cuda" else dims.local_rank
    where = [None] * dist.get_world_size()
    dist.all_gather_object(where, (socket.gethostname(), dims.local_rank, int(gpu or 0)))
    leaders = [host for host, local_rank, _ in where if local_rank == 0]
    missing = sorted({host for host, _, _ in where} - set(leaders))
    if missing:
        raise WeightSyncError(f"weight_sync.transport 'tensor': no rank with local rank 0 on host(s) {missing}")
    return {(leaders.index(host), gpu): rank for rank, (host, _, gpu) in enumerate(where)}


class TensorTransport(Transport):
    name = "tensor"

    def __init__(self, cfg, dims, engine=None, rank_of_gpu: Optional[Dict[Tuple[int, int], int]] = None) -> None:
        """rank_of_gpu: (node, GPU) -> trainer rank, where each rank runs; None: `gather_rank_of_gpu` at the
        first prepare (tests set a made-up multi-node layout before it)."""
        super().__init__(cfg, dims, engine)
        self.rank_of_gpu = rank_of_gpu
        self._one_dtype_per_bucket: Optional[bool] = None
        self._routes: Optional[Dict[str, List[int]]] = None  # url -> producer rank of each TP rank (rank 0)
        self._producers: frozenset = frozenset()  # every rank some route names (every rank)
        self._group = None  # stage sources + producers (None: the whole world)
        self._member = True
        self._version = 0
        self._prepared = False
        self.payloads_made = 0  # payloads this rank serialized (its own copies)
        self.last_post: Dict[str, List[int]] = {}  # rank 0: url -> the rank whose payload each TP rank got

    def receiver_error(self) -> Optional[str]:
        if self.cfg.fp8 and self.dims.tp > 1:
            return ("weight_sync.transport: 'tensor' with weight_sync.fp8 needs parallel.tp=1 (the FP8 export "
                    "builds buckets on the stage source only; the TP peers that feed other GPUs' payloads cannot "
                    "see where a bucket ends)")
        if not all(hasattr(self.engine, method) for method in RECEIVER_METHODS):
            return "weight_sync.transport: 'tensor' needs SGLang servers (rollout.engine=sglang)"
        return None

    # ---- set-up (collective) -------------------------------------------------------------------
    def prepare(self, version: int) -> None:
        self._version = int(version)
        if self._prepared:
            return
        rank0 = dist.get_rank() == 0
        if rank0:
            require_receiver(self.engine, "tensor", RECEIVER_METHODS)
        rank_of_gpu = self.rank_of_gpu if self.rank_of_gpu is not None else gather_rank_of_gpu(self.dims)
        answer: list = [None]
        if rank0:
            try:
                answer[0] = (dict(self.engine.ipc_routes(rank_of_gpu)), not bool(self.engine.accepts_mixed_dtype_buckets))
            except (ValueError, RuntimeError) as exc:
                answer[0] = str(exc)
        dist.broadcast_object_list(answer, src=0)
        if isinstance(answer[0], str):
            raise WeightSyncError(answer[0])
        routes, self._one_dtype_per_bucket = answer[0]
        if rank0:
            self._routes = routes
        self._producers = frozenset(r for ranks in routes.values() for r in ranks)
        sources = [None] * dist.get_world_size()
        dist.all_gather_object(sources, is_export_source(self.dims))
        members = sorted(self._producers | {r for r, s in enumerate(sources) if s})
        if len(members) < dist.get_world_size():  # collective: every rank creates the group
            self._group = dist.new_group(members)
            self._member = dist.get_rank() in members
        self._prepared = True

    # ---- the rounds ----------------------------------------------------------------------------
    def send(self, bucket: List[NamedTensor], version: int) -> None:
        parts = []
        for part in (split_by_dtype(bucket) if self._one_dtype_per_bucket else [bucket]):
            parts.append(flatten_tensors(part, release=True))  # bucket and buffers never both resident
        self._round(parts)
        del parts  # released only after rank 0's requests returned: the engine has copied the weights

    def peer_bucket(self) -> None:
        """A TP peer of a stage source, where its source sends a bucket: the same round, with nothing."""
        self._round(None)

    def finish(self, version: int) -> None:
        while not self._round(None):
            pass
        if self.dims.device.type == "cuda":
            torch.cuda.ipc_collect()  # the servers closed their handles: let the driver free those blocks

    def _round(self, parts: Optional[Sequence[Tuple[torch.Tensor, list]]]) -> bool:
        """One exchange among all ranks; True when no stage source had a bucket (everyone is done)."""
        header = None if parts is None else (self.dims.pp_rank, [(meta, buf.numel()) for buf, meta in parts])
        headers = [None] * dist.get_world_size()
        dist.all_gather_object(headers, header)
        senders = sorted((h[0], rank) for rank, h in enumerate(headers) if h is not None)
        for _, source in senders:  # stage order: the engine loads stage 0's bucket first
            for index, (metadata, nbytes) in enumerate(headers[source][1]):
                mine = parts[index][0] if dist.get_rank() == source else None
                self._share(source, mine, nbytes, metadata)
        return not senders

    def _share(self, source: int, buf: Optional[torch.Tensor], nbytes: int, metadata: list) -> None:
        """One flattened buffer from `source` to every producer, each producer's payload to rank 0."""
        rank = dist.get_rank()
        copy = None
        if self._member:
            copy = buf if rank == source else torch.empty(nbytes, dtype=torch.uint8, device=self.dims.device)
            dist.broadcast(copy, src=source, group=self._group)
        payload = None
        if rank in self._producers:
            if copy.is_cuda:  # the broadcast / flatten ran on a stream the server process does not wait on
                torch.cuda.current_stream(copy.device).synchronize()
            payload = (rank, serialize_payload(copy, metadata))
            self.payloads_made += 1
        gathered = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        error = [None]
        if rank == 0:
            try:
                self._post(gathered)
            except (RuntimeError, ValueError) as exc:
                error[0] = str(exc)
        dist.broadcast_object_list(error, src=0)  # every copy stays alive until the servers have read it
        del copy
        if error[0] is not None:
            raise WeightSyncError(error[0])

    def _post(self, gathered: list) -> None:
        """Rank 0: server url -> [payload of route rank i for TP rank i], checked against who made it."""
        made_by = {}
        for index, item in enumerate(gathered):
            if item is not None:
                if item[0] != index:
                    raise WeightSyncError(f"weight_sync 'tensor': rank {index} sent the payload of rank {item[0]}")
                made_by[item[0]] = item[1]
        for url, ranks in self._routes.items():
            missing = [r for r in ranks if r not in made_by]
            if missing:
                raise WeightSyncError(f"weight_sync 'tensor': no payload from rank(s) {missing} for {url}")
        self.last_post = {url: list(ranks) for url, ranks in self._routes.items()}
        payloads = {url: [made_by[r] for r in ranks] for url, ranks in self._routes.items()}
        self.engine.load_serialized_buckets(payloads, self._version, LOAD_FORMAT)

