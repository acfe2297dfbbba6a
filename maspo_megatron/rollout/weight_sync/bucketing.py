"""Pack a stream of HF tensors into buckets of at most `bucket_bytes`, keeping groups whole.

The stream is `(hf_name, tensor, group_key)`: consecutive tensors with the same non-None
`group_key` (the q/k/v split of one fused Megatron qkv, gate/up of one fc1, an FP8 weight with its
`weight_scale_inv`) must reach the engine in the same bucket, so a group is never split; a group or
tensor bigger than `bucket_bytes` gets a bucket of its own. This is a generator that holds only
the bucket it is filling (plus the group being read): while the consumer still holds the previous
bucket, at most two buckets are alive.
"""
from __future__ import annotations

from typing import Hashable, Iterable, Iterator, List, Optional, Tuple

import torch

NamedTensor = Tuple[str, torch.Tensor]
HFItem = Tuple[str, torch.Tensor, Optional[Hashable]]


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucket_nbytes(bucket: List[NamedTensor]) -> int:
    return sum(tensor_nbytes(t) for _, t in bucket)


def iter_buckets(items: Iterable[HFItem], bucket_bytes: int) -> Iterator[List[NamedTensor]]:
    """(hf_name, tensor, group_key) stream -> lists of (hf_name, tensor), each <= bucket_bytes unless one group is larger.

    Raises ValueError on a repeated name or on a group whose members are not consecutive
    (it would be split across buckets).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"weight_sync.bucket_bytes: must be > 0, got {bucket_bytes}")
    seen_names: set = set()
    closed_groups: set = set()
    bucket: List[NamedTensor] = []
    bucket_size = 0
    group: List[NamedTensor] = []
    group_key: Optional[Hashable] = None
    group_size = 0

    def place_group() -> Iterator[List[NamedTensor]]:
        # Emits the current bucket first if the group does not fit beside it.
        nonlocal bucket, bucket_size
        if bucket and bucket_size + group_size > bucket_bytes:
            full, bucket, bucket_size = bucket, [], 0
            yield full
        bucket.extend(group)
        bucket_size += group_size
        if bucket_size >= bucket_bytes:
            full, bucket, bucket_size = bucket, [], 0
            yield full

    for name, tensor, key in items:
        if name in seen_names:
            raise ValueError(f"weight sync: tensor {name!r} was produced twice")
        seen_names.add(name)
        if group and (key is None or key != group_key):
            yield from place_group()
            if group_key is not None:
                closed_groups.add(group_key)
            group, group_size = [], 0
        if key is not None and key in closed_groups:
            raise ValueError(f"weight sync: group {key!r} is not contiguous in the stream ({name!r} arrived after "
                             "other tensors); it would be split across buckets")
        group.append((name, tensor))
        group_key = key
        group_size += tensor_nbytes(tensor)
        tensor = None  # the loop variable must not pin a tensor of an already-yielded bucket
    if group:
        yield from place_group()
    if bucket:
        yield bucket
