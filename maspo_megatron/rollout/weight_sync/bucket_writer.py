"""The export fast path: TP shards scattered straight into reused, pre-touched bucket buffers.

`megatron_hf_stream` + `iter_buckets` (the general path, still used with FP8) materialise every full
Megatron tensor and then every split HF tensor in fresh memory: each byte is copied twice, and on
CPU every fresh allocation pays page faults (clone into fresh memory runs at ~1/5 of memcpy). Here
the HF layout of each Megatron parameter is known before its gather (`WeightMap.hf_shapes`), so:

- the bucket slot of every HF tensor is reserved first (a group never splits: it moves whole to the
  next bucket, or gets a bucket of its own when larger than `bucket_bytes`);
- each TP shard (own shard, or a peer's shard in the /dev/shm staging buffer) is copied once, as a
  strided narrow copy, into its rows of q/k/v, gate/up or the plain tensor (padded vocab rows are
  never copied);
- buckets live in `BucketBuffers`, reused across buckets and syncs: ONE buffer by default (the
  syncer), so a transport that packs a fresh flattened buffer per bucket (tensor) still peaks at two
  buckets; `count=2` alternates two buffers for consumers that hold a bucket while the next fills.

Lifetime (the consumer's contract): a yielded bucket's tensors are VIEWS of a reused buffer. With
one buffer they are valid until the consumer asks for the next bucket (with two: until it asks for
the bucket after next). Consumers must finish with a bucket (copy it into parameters, write it to
disk, broadcast it, flatten it) before then and must not keep its tensors; every transport here does
so synchronously inside `send`.
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from maspo_megatron.models.hf_loader import stage_layer_offset
from maspo_megatron.rollout.weight_sync.bucketing import NamedTensor
from maspo_megatron.rollout.weight_sync.flattened_bucket import ALIGN_BYTES
from maspo_megatron.rollout.weight_sync.hf_stream import is_export_source, mapped_parameters, takes_part, unwrap
from maspo_megatron.rollout.weight_sync.tp_gather import TPGatherer


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


class BucketBuffers:
    """`count` uint8[bucket_bytes] buffers used in turn (1 or 2); each pre-touched once.

    keep=True (CPU default) holds them between syncs, so page faults are paid once per run, not once
    per bucket; keep=False drops them at `release()` (GPUs: the caching allocator makes a fresh
    buffer cheap, and the memory goes back to training between syncs).
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

    def release(self) -> None:
        self._turn = 0
        if not self.keep:
            self._buffers = [None] * len(self._buffers)


def _check_shards(name: str, shards: Sequence[torch.Tensor], dim: Optional[int], full: Tuple[int, ...]) -> None:
    got = list(shards[0].shape)
    if dim is not None:
        got[dim] *= len(shards)
    if tuple(got) != tuple(full) or any(s.shape != shards[0].shape for s in shards):
        raise ValueError(f"{name}: TP shards {[tuple(s.shape) for s in shards]} do not assemble to {tuple(full)}")


def scatter_shards(layout: str, shards: Sequence[torch.Tensor], dim: Optional[int], dests: Sequence[torch.Tensor],
                   num_heads: int, num_groups: int) -> None:
    """Copy TP shards (rank order) of one full Megatron tensor into its HF tensors `dests`, each byte once.

    The same result as `WeightMap.megatron_to_hf(layouts.gather_tp(shards, dim, glu))`:
    copy:    full = cat(shards, dim)                      -> dests[0]
    vocab:   full[Vp, H] = cat(shards, 0), rows >= V dropped -> dests[0][V, H]
    gate_up: shard r = [gate_r; up_r] (dim 0)            -> gate[F, H], up[F, H]
    qkv:     shard r = groups r*G/tp.. of [q heads, k, v] -> q[Q*D, ...], k[G*D, ...], v[G*D, ...]
    """
    tp = len(shards) if dim is not None else 1
    shards = shards[:tp]
    if layout == "copy":
        targets = dests[0].chunk(tp, dim=dim) if tp > 1 else [dests[0]]
        for target, shard in zip(targets, shards, strict=True):
            target.copy_(shard)
        return
    if layout == "vocab":
        if dim not in (None, 0):
            raise ValueError(f"vocab layout split over dim {dim}: only dim 0 is supported")
        rows, start = dests[0].shape[0], 0
        for shard in shards:
            take = max(0, min(shard.shape[0], rows - start))
            if take:
                dests[0].narrow(0, start, take).copy_(shard.narrow(0, 0, take))
            start += shard.shape[0]
        return
    if dim not in (None, 0):
        raise ValueError(f"{layout} layout split over dim {dim}: only dim 0 is supported")
    if layout == "gate_up":
        gate, up = dests
        rows = gate.shape[0] // tp
        for rank, shard in enumerate(shards):
            gate.narrow(0, rank * rows, rows).copy_(shard.narrow(0, 0, rows))
            up.narrow(0, rank * rows, rows).copy_(shard.narrow(0, rows, rows))
        return
    if layout == "qkv":
        q, k, v = dests
        rest = tuple(q.shape[1:])
        heads_per_group = num_heads // num_groups
        head_dim = q.shape[0] // num_heads
        groups_per_rank = num_groups // tp
        q_groups = q.view(num_groups, heads_per_group * head_dim, *rest)
        k_groups = k.view(num_groups, head_dim, *rest)
        v_groups = v.view(num_groups, head_dim, *rest)
        q_rows = heads_per_group * head_dim
        for rank, shard in enumerate(shards):
            grouped = shard.view(groups_per_rank, (heads_per_group + 2) * head_dim, *rest)
            first = rank * groups_per_rank
            q_groups.narrow(0, first, groups_per_rank).copy_(grouped.narrow(1, 0, q_rows))
            k_groups.narrow(0, first, groups_per_rank).copy_(grouped.narrow(1, q_rows, head_dim))
            v_groups.narrow(0, first, groups_per_rank).copy_(grouped.narrow(1, q_rows + head_dim, head_dim))
        return
    raise ValueError(f"unknown layout {layout!r}")


@torch.no_grad()
def iter_export_buckets(chunks: Sequence[torch.nn.Module], wmap, dims, buffers: BucketBuffers
                        ) -> Iterator[List[NamedTensor]]:
    """Buckets of (hf_name, view into a reused buffer) for this rank's chunks, on the stage's export
    source; every rank of the stage's TP group must iterate it to the end (one TP gather per sharded
    parameter). Packing: tensors start at 16-byte multiples (`ALIGN_BYTES`), a bucket holds at most
    `buffers.bucket_bytes` aligned bytes unless one group alone is larger, the HF tensors of one
    Megatron parameter are never split. See the module docstring for how long a bucket's views live.
    """
    if not takes_part(dims):
        return
    source = is_export_source(dims)
    bucket_bytes = buffers.bucket_bytes
    sharded = [p for chunk in chunks for n, p in mapped_parameters(chunk, wmap) if wmap.tp_split(n)[0] is not None]
    bucket: List[NamedTensor] = []
    buf: Optional[torch.Tensor] = None
    used = 0
    try:
        with TPGatherer(sharded, dims) as gatherer:
            for chunk in chunks:
                inner = unwrap(chunk)
                offset = stage_layer_offset(inner)
                for name, param in mapped_parameters(inner, wmap):
                    dim, _ = wmap.tp_split(name)
                    if not source:
                        gatherer.gather_shards(param, dim)
                        continue
                    rule, layer = wmap.resolve(name, offset)
                    hf_names = [n.format(i=layer) for n in rule.hf]
                    shapes = wmap.hf_shapes(rule)
                    sizes = [_aligned(int(torch.Size(s).numel()) * param.element_size()) for s in shapes]
                    group_bytes = sum(sizes)
                    if bucket and used + group_bytes > bucket_bytes:
                        yield bucket
                        bucket, buf, used = [], None, 0
                    if buf is None:
                        buf = buffers.next_buffer(max(group_bytes, bucket_bytes))
                    dests = []
                    for hf_name, shape, size in zip(hf_names, shapes, sizes, strict=True):
                        numel = int(torch.Size(shape).numel())
                        view = buf[used:used + numel * param.element_size()].view(param.dtype).view(shape)
                        dests.append(view)
                        bucket.append((hf_name, view))
                        used += size
                    shards = gatherer.gather_shards(param, dim)
                    _check_shards(name, shards, dim, wmap.full_shape(rule))
                    scatter_shards(rule.layout, shards, dim, dests, wmap.meta.num_heads, wmap.meta.num_kv_heads)
                    del shards, dests
                    if used >= bucket_bytes:
                        yield bucket
                        bucket, buf, used = [], None, 0
        if bucket:
            yield bucket
    finally:
        buffers.release()
