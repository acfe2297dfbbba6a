"""The export fast path: TP shards scattered straight into reused, pre-touched bucket buffers.

`megatron_hf_stream` + `iter_buckets` (the general path, still used with FP8) materialise every full
Megatron tensor and then every split HF tensor in fresh memory: each byte is copied twice, and on
CPU every fresh allocation pays page faults (clone into fresh memory runs at ~1/5 of memcpy). Here
the HF layout of each Megatron parameter is known before its gather (`WeightMap.hf_shapes`), so the
buckets are planned first (`plan_buckets`, the same on every TP rank: a group never splits, it moves
whole to the next bucket, or gets a bucket of its own when larger than `bucket_bytes`), and each TP
shard is copied once, as a strided narrow copy, into its rows of q/k/v, gate/up or the plain tensor
(padded vocab rows are never copied). Two ways to get the shards there:

- shared bucket (every TP rank a CPU process of one host, shared_bucket.py): the bucket buffer is
  /dev/shm mapped by the whole TP group; each rank writes ONLY ITS OWN shard (`scatter_shard`), all
  ranks in parallel, one TP barrier when a bucket is full (then the source yields it) and one when
  the source asks for the next (its consumer is done). Replicated tensors are written by the source.
- collective (CUDA, or ranks on several hosts): each shard travels to the source (tp_gather.py) and
  the source scatters all of them (`scatter_shards`) into a private buffer.

Buffers are reused across buckets and syncs (`BucketBuffers`): ONE by default (the syncer), so a
transport that packs a fresh flattened buffer per bucket (tensor) still peaks at two buckets;
`count=2` alternates two for consumers that hold a bucket while the next fills.

Lifetime (the consumer's contract): a yielded bucket's tensors are VIEWS of a reused buffer. With
one buffer they are valid until the consumer asks for the next bucket (with two: until it asks for
the bucket after next). Consumers must finish with a bucket (copy it into parameters, write it to
disk, broadcast it, flatten it) before then and must not keep its tensors; every transport here does
so synchronously inside `send`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from maspo_megatron.models.weight_map import stage_layer_offset
from maspo_megatron.models.wrappers import unwrap
from maspo_megatron.rollout.weight_sync.bucketing import NamedTensor
from maspo_megatron.rollout.weight_sync.flattened_bucket import ALIGN_BYTES
from maspo_megatron.rollout.weight_sync.hf_stream import is_export_source, mapped_parameters, takes_part
from maspo_megatron.rollout.weight_sync.shared_bucket import SharedBucket, one_cpu_host
from maspo_megatron.rollout.weight_sync.tp_gather import TPGatherer


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


class BucketBuffers:
    """`count` uint8[bucket_bytes] buffers used in turn (1 or 2); each pre-touched once.

    keep=True (CPU default) holds them between syncs, so page faults are paid once per run, not once
    per bucket; keep=False drops them at `release()` (GPUs: the caching allocator makes a fresh
    buffer cheap, and the memory goes back to training between syncs). On the shared-bucket path the
    `count` slots live in one `SharedBucket` (`shared`) instead, kept the same way.
    """

    def __init__(self, bucket_bytes: int, device: Optional[torch.device] = None, keep: Optional[bool] = None,
                 count: int = 1) -> None:
        if bucket_bytes <= 0:
            raise ValueError(f"weight_sync.bucket_bytes: must be > 0, got {bucket_bytes}")
        if count not in (1, 2):
            raise ValueError(f"BucketBuffers.count: 1 or 2 (at most two buckets alive), got {count}")
        self.bucket_bytes = int(bucket_bytes)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.keep = self.device.type == "cpu" if keep is None else keep
        self._buffers: List[Optional[torch.Tensor]] = [None] * count
        self._turn = 0
        self.shared: Optional[SharedBucket] = None
        self.one_host: Optional[bool] = None  # decided once (a collective), on the first sync

    @property
    def count(self) -> int:
        return len(self._buffers)

    def next_buffer(self, nbytes: int) -> torch.Tensor:
        """The buffer for the next bucket (uint8[>= nbytes]); a bucket larger than bucket_bytes (one
        oversize group) gets a one-off buffer in place of the slot it takes its turn in."""
        slot = self._turn
        self._turn = (self._turn + 1) % len(self._buffers)
        if nbytes > self.bucket_bytes:
            self._buffers[slot] = None  # the previous occupant of this turn is dead by the contract
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if self._buffers[slot] is None:
            # zeros, not empty: touching every page now keeps page faults out of the copies
            self._buffers[slot] = torch.zeros(self.bucket_bytes, dtype=torch.uint8, device=self.device)
        return self._buffers[slot]

    def shared_slots(self, slot_bytes: int, dims) -> List[torch.Tensor]:
        """`count` uint8[slot_bytes] views of the TP group's shared bucket, (re)mapped when too small.
        A collective when it (re)maps: every TP rank passes the same slot_bytes (same plan)."""
        slot_bytes = max(slot_bytes, self.bucket_bytes)
        if self.shared is None or self.shared.nbytes < slot_bytes * self.count:
            self.shared = None  # unmap the old one first: never two alive
            self.shared = SharedBucket.open(slot_bytes * self.count, dims)
        size = self.shared.nbytes // self.count
        return [self.shared.tensor[i * size:(i + 1) * size] for i in range(self.count)]

    def release(self) -> None:
        self._turn = 0
        if not self.keep:
            self._buffers = [None] * len(self._buffers)
            self.shared = None


# ---- per-shard scatter --------------------------------------------------------------------------
def _check_shard(name: str, shard: torch.Tensor, dim: Optional[int], tp: int, full: Tuple[int, ...]) -> None:
    want = list(full)
    if dim is not None:
        want[dim] //= tp
    if tuple(shard.shape) != tuple(want):
        raise ValueError(f"{name}: TP shard of shape {tuple(shard.shape)}, expected {tuple(want)} (full {tuple(full)}, tp {tp})")


def scatter_shard(layout: str, shard: torch.Tensor, rank: int, tp: int, dim: Optional[int], dests: Sequence[torch.Tensor],
                  num_heads: int, num_groups: int) -> None:
    """Copy TP rank `rank`'s shard (of `tp`) of one Megatron tensor into its rows of the HF tensors `dests`.

    dim None (replicated): the whole tensor, as rank 0 of 1. Layouts (full = cat(shards, dim)):
    copy:    full                                      -> dests[0]   (split over `dim`)
    vocab:   full[Vp, H], rows >= V dropped             -> dests[0][V, H]
    gate_up: shard r = [gate_r; up_r] (dim 0)           -> gate[F, H], up[F, H]
    qkv:     shard r = groups r*G/tp.. of [q heads, k, v] -> q[Q*D, ...], k[G*D, ...], v[G*D, ...]
    """
    if dim is None:
        rank, tp = 0, 1
    if layout == "copy":
        target = dests[0].chunk(tp, dim=dim)[rank] if tp > 1 else dests[0]
        target.copy_(shard)
        return
    if dim not in (None, 0):
        raise ValueError(f"{layout} layout split over dim {dim}: only dim 0 is supported")
    if layout == "vocab":
        rows, start = dests[0].shape[0], rank * shard.shape[0]
        take = max(0, min(shard.shape[0], rows - start))
        if take:
            dests[0].narrow(0, start, take).copy_(shard.narrow(0, 0, take))
        return
    if layout == "gate_up":
        gate, up = dests
        rows = gate.shape[0] // tp
        gate.narrow(0, rank * rows, rows).copy_(shard.narrow(0, 0, rows))
        up.narrow(0, rank * rows, rows).copy_(shard.narrow(0, rows, rows))
        return
    if layout == "qkv":
        q, k, v = dests
        rest = tuple(q.shape[1:])
        heads_per_group = num_heads // num_groups
        head_dim = q.shape[0] // num_heads
        groups_per_rank = num_groups // tp
        q_rows = heads_per_group * head_dim
        grouped = shard.view(groups_per_rank, (heads_per_group + 2) * head_dim, *rest)
        first = rank * groups_per_rank
        q.view(num_groups, q_rows, *rest).narrow(0, first, groups_per_rank).copy_(grouped.narrow(1, 0, q_rows))
        k.view(num_groups, head_dim, *rest).narrow(0, first, groups_per_rank).copy_(grouped.narrow(1, q_rows, head_dim))
        v.view(num_groups, head_dim, *rest).narrow(0, first, groups_per_rank).copy_(
            grouped.narrow(1, q_rows + head_dim, head_dim))
        return
    raise ValueError(f"unknown layout {layout!r}")


def scatter_shards(layout: str, shards: Sequence[torch.Tensor], dim: Optional[int], dests: Sequence[torch.Tensor],
                   num_heads: int, num_groups: int) -> None:
    """All TP shards (rank order) of one full Megatron tensor into its HF tensors `dests`, each byte once.

    The same result as `WeightMap.megatron_to_hf(layouts.gather_tp(shards, dim, glu))`; see `scatter_shard`.
    """
    tp = len(shards) if dim is not None else 1
    for rank, shard in enumerate(shards[:tp]):
        scatter_shard(layout, shard, rank, tp, dim, dests, num_heads, num_groups)


# ---- planning (deterministic: the same on every TP rank of a stage) ----------------------------------
@dataclasses.dataclass
class PlannedParam:
    """One Megatron parameter's place in a bucket: its HF tensors at byte offsets of the bucket buffer."""

    name: str
    param: torch.Tensor
    dim: Optional[int]
    layout: str
    full_shape: Tuple[int, ...]
    hf: List[Tuple[str, Tuple[int, ...], int]]  # (hf_name, shape, byte offset)


@dataclasses.dataclass
class PlannedBucket:
    params: List[PlannedParam]
    nbytes: int  # aligned bytes used; > bucket_bytes only for one oversize group


def plan_buckets(chunks: Sequence[torch.nn.Module], wmap, bucket_bytes: int) -> List[PlannedBucket]:
    """This rank's mapped parameters packed into buckets: tensors start at 16-byte multiples
    (`ALIGN_BYTES`), a bucket holds at most `bucket_bytes` aligned bytes unless one group alone is
    larger, the HF tensors of one Megatron parameter are never split. Only names and shapes are used,
    so every TP rank of a stage gets the same plan."""
    buckets: List[PlannedBucket] = []
    current: List[PlannedParam] = []
    used = 0
    for chunk in chunks:
        inner = unwrap(chunk)
        offset = stage_layer_offset(inner)
        for name, param in mapped_parameters(inner, wmap):
            rule, layer = wmap.resolve(name, offset)
            shapes = [tuple(s) for s in wmap.hf_shapes(rule)]
            sizes = [_aligned(int(torch.Size(s).numel()) * param.element_size()) for s in shapes]
            if current and used + sum(sizes) > bucket_bytes:
                buckets.append(PlannedBucket(current, used))
                current, used = [], 0
            hf = []
            for hf_name, shape, size in zip(rule.hf, shapes, sizes, strict=True):
                hf.append((hf_name.format(i=layer), shape, used))
                used += size
            current.append(PlannedParam(name, param, wmap.tp_split(name)[0], rule.layout, wmap.full_shape(rule), hf))
            if used >= bucket_bytes:
                buckets.append(PlannedBucket(current, used))
                current, used = [], 0
    if current:
        buckets.append(PlannedBucket(current, used))
    return buckets


def _views(buf: torch.Tensor, planned: PlannedParam) -> List[NamedTensor]:
    dtype, itemsize = planned.param.dtype, planned.param.element_size()
    return [(hf_name, buf[start:start + int(torch.Size(shape).numel()) * itemsize].view(dtype).view(shape))
            for hf_name, shape, start in planned.hf]


# ---- the iterator ---------------------------------------------------------------------------------
@torch.no_grad()
def iter_export_buckets(chunks: Sequence[torch.nn.Module], wmap, dims, buffers: BucketBuffers,
                        shared: Optional[bool] = None,
                        on_peer_bucket: Optional[Callable[[], None]] = None) -> Iterator[List[NamedTensor]]:
    """Buckets of (hf_name, view into a reused buffer) for this rank's chunks, on the stage's export
    source; every rank of the stage's TP group must iterate it to the end. Packing: `plan_buckets`.
    shared: None picks the shared bucket when every TP rank is a CPU process of this host (decided
    once per `buffers`), True/False force it (tests, benchmark). See the module docstring for how long
    a bucket's views live. on_peer_bucket: called on every other TP rank where the source yields a
    bucket (the plan is the same on every TP rank), for consumers that need the whole group per bucket.
    """
    if not takes_part(dims):
        return
    plan = plan_buckets(chunks, wmap, buffers.bucket_bytes)
    if shared is None:
        if buffers.one_host is None:
            buffers.one_host = one_cpu_host([p.param for b in plan for p in b.params], dims)
        shared = buffers.one_host
    try:
        if shared and dims.tp > 1:
            yield from _shared_buckets(plan, wmap, dims, buffers, on_peer_bucket)
        else:
            yield from _collective_buckets(plan, wmap, dims, buffers, on_peer_bucket)
    finally:
        buffers.release()


def _shared_buckets(plan: List[PlannedBucket], wmap, dims, buffers: BucketBuffers,
                    on_peer_bucket: Optional[Callable[[], None]]) -> Iterator[List[NamedTensor]]:
    """Each TP rank writes its own shards into the group's shared bucket; the source yields it."""
    slots = buffers.shared_slots(max((b.nbytes for b in plan), default=0), dims)
    source = is_export_source(dims)
    meta = wmap.meta
    for index, bucket in enumerate(plan):
        if index:  # the source asked for this bucket: its consumer is done with the one in this slot
            buffers.shared.barrier()
        buf = slots[index % len(slots)]
        views = []
        for planned in bucket.params:
            named = _views(buf, planned)
            views.extend(named)
            if planned.dim is None and not source:
                continue  # replicated: the source writes it
            shard = planned.param.detach().contiguous()
            _check_shard(planned.name, shard, planned.dim, dims.tp, planned.full_shape)
            scatter_shard(planned.layout, shard, dims.tp_rank, dims.tp, planned.dim, [t for _, t in named],
                          meta.num_heads, meta.num_kv_heads)
        buffers.shared.barrier()  # every rank's rows are in
        if source:
            yield views
        elif on_peer_bucket is not None:
            on_peer_bucket()
        del views
    if plan:  # the next sync must not overwrite the last bucket before the consumer is done with it
        buffers.shared.barrier()


def _collective_buckets(plan: List[PlannedBucket], wmap, dims, buffers: BucketBuffers,
                        on_peer_bucket: Optional[Callable[[], None]]) -> Iterator[List[NamedTensor]]:
    """Every shard travels to the source (one TP gather per sharded parameter), which scatters them."""
    source = is_export_source(dims)
    meta = wmap.meta
    sharded = [p.param for b in plan for p in b.params if p.dim is not None]
    with TPGatherer(sharded, dims) as gatherer:
        for bucket in plan:
            buf = buffers.next_buffer(bucket.nbytes) if source else None
            views = []
            for planned in bucket.params:
                shards = gatherer.gather_shards(planned.param, planned.dim)
                if not source:
                    continue
                named = _views(buf, planned)
                views.extend(named)
                tp = len(shards) if planned.dim is not None else 1
                for shard in shards[:tp]:
                    _check_shard(planned.name, shard, planned.dim, tp, planned.full_shape)
                scatter_shards(planned.layout, shards, planned.dim, [t for _, t in named],
                               meta.num_heads, meta.num_kv_heads)
                del shards
            if source:
                yield views
            elif on_peer_bucket is not None:
                on_peer_bucket()
            del views
