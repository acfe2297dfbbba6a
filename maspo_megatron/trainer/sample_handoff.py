"""The driver's rollout samples to every rank as flat tensors (not pickled Python lists).

    samples = broadcast_samples(samples_on_rank0 if dims.rank == 0 else None, dims)

Global rank 0 (the driver) flattens the samples into five CPU tensors and broadcasts them over the
default group; every other rank gets TrainSamples whose fields are views into those tensors:

    header[5]   int64   N, id count, log-prob count, advantage count, id dtype code (0 int32, 1 int64)
    counts[N,3] int64   prompt tokens, response tokens, flags (1: per-token advantage, 2: has log-probs)
    ids[I]      int32   prompt then response ids of every sample, sample after sample (int64 when an
                        id does not fit int32)
    log_probs[L] fp32   response log-probs of the samples that have them (the engines' precision,
                        and what the packer stores)
    advantages[A] fp64  one value per scalar-advantage sample, r values per per-token sample (exact)

Why a full broadcast rather than a scatter by data-parallel rank: every rank packs the GLOBAL batch
itself (trainer/batch.py `pack_micro_batches`: rows, DP balance and the global normalisers come from
every sample's length), so every rank needs every sample's lengths; sending it the ids and log-probs
as well costs one broadcast of ~5 bytes per token over gloo, no pickling and no Python objects per
token on either side. On a GPU cluster the default group is "cpu:gloo,cuda:nccl": these tensors
stay on the CPU (device="cpu") and travel over gloo, the trainer moves the packed micro-batches.

On the receiving ranks `prompt_ids` / `response_ids` are 1-D integer tensors, `old_log_probs` a 1-D
fp32 tensor or None, and `advantage` a Python float or a 1-D fp64 tensor; rank 0 returns the list
it was given. The packer then builds identical micro-batches on every rank (checked by the tests).
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from maspo_megatron.trainer.batch import TrainSample

_PER_TOKEN_ADVANTAGE = 1
_HAS_LOG_PROBS = 2
_ID_DTYPES = (torch.int32, torch.int64)
_CPU = torch.device("cpu")


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float, np.generic)) or (isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0)


def _fits_int32(ids: torch.Tensor) -> bool:
    if ids.numel() == 0 or ids.dtype in (torch.int32, torch.int16, torch.int8, torch.uint8):
        return True
    return -2**31 <= int(ids.min()) and int(ids.max()) < 2**31  # Python ints: no wrap-around in the test


def _flat(parts: Sequence, dtype: torch.dtype) -> torch.Tensor:
    """The concatenation of 1-D sequences (lists or tensors) as one CPU tensor of `dtype`.

    Consecutive lists are read by ONE `np.fromiter` over a chained iterator (about 20 ns a number,
    a quarter of what pickling them costs; torch.tensor(list) is ~7x slower); tensors are copied.
    An integer that does not fit `dtype` raises OverflowError."""
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    arrays, run = [], []

    def flush() -> None:
        if run:
            count = sum(len(p) for p in run)
            arrays.append(np.fromiter(itertools.chain.from_iterable(run), dtype=np_dtype, count=count))
            run.clear()

    for part in parts:
        if isinstance(part, torch.Tensor):
            flush()
            arrays.append(part.detach().reshape(-1).to(device=_CPU, dtype=dtype).numpy())
        else:
            run.append(part)
    flush()
    if not arrays:
        return torch.empty(0, dtype=dtype, device=_CPU)
    return torch.from_numpy(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))


def _check_lengths(index: int, sample: TrainSample, per_token: bool) -> None:
    responses = len(sample.response_ids)
    if per_token and len(sample.advantage) != responses:
        raise ValueError(f"TrainSample.advantage: {len(sample.advantage)} values for {responses} response tokens "
                         f"(sample {index})")
    if sample.old_log_probs is not None and len(sample.old_log_probs) != responses:
        raise ValueError(f"TrainSample.old_log_probs: {len(sample.old_log_probs)} values for {responses} response "
                         f"tokens (sample {index})")


def pack_samples(samples: Sequence[TrainSample]) -> List[torch.Tensor]:
    """[header[5], counts[N, 3], ids[I], log_probs[L], advantages[A]] on the CPU (see the module docstring)."""
    counts = []
    id_parts, lp_parts, adv_parts = [], [], []
    id_total = lp_total = adv_total = 0
    for index, sample in enumerate(samples):
        per_token = not _is_scalar(sample.advantage)
        _check_lengths(index, sample, per_token)
        prompt, response = len(sample.prompt_ids), len(sample.response_ids)
        flags = (_PER_TOKEN_ADVANTAGE if per_token else 0) | (_HAS_LOG_PROBS if sample.old_log_probs is not None else 0)
        counts.append((prompt, response, flags))
        id_parts += [sample.prompt_ids, sample.response_ids]
        id_total += prompt + response
        if sample.old_log_probs is not None:
            lp_parts.append(sample.old_log_probs)
            lp_total += response
        adv_parts.append(sample.advantage if per_token else [float(sample.advantage)])
        adv_total += response if per_token else 1
    try:
        id_code, ids = 0, _flat(id_parts, torch.int32)
        if not all(_fits_int32(p) for p in id_parts if isinstance(p, torch.Tensor)):
            raise OverflowError  # a tensor cast to int32 would wrap silently
    except OverflowError:
        id_code, ids = 1, _flat(id_parts, torch.int64)
    log_probs = _flat(lp_parts, torch.float32)
    advantages = _flat(adv_parts, torch.float64)
    header = torch.tensor([len(samples), id_total, lp_total, adv_total, id_code], dtype=torch.int64, device=_CPU)
    counts_tensor = torch.tensor(counts, dtype=torch.int64, device=_CPU).reshape(len(samples), 3)
    return [header, counts_tensor, ids, log_probs, advantages]


def unpack_samples(counts: torch.Tensor, ids: torch.Tensor, log_probs: torch.Tensor,
                   advantages: torch.Tensor) -> List[TrainSample]:
    """The TrainSamples described by `pack_samples`'s tensors; fields are views (no copies)."""
    out = []
    id_at = lp_at = adv_at = 0
    for prompt, response, flags in counts.tolist():
        prompt_ids = ids[id_at:id_at + prompt]
        response_ids = ids[id_at + prompt:id_at + prompt + response]
        id_at += prompt + response
        old = None
        if flags & _HAS_LOG_PROBS:
            old = log_probs[lp_at:lp_at + response]
            lp_at += response
        if flags & _PER_TOKEN_ADVANTAGE:
            advantage = advantages[adv_at:adv_at + response]
            adv_at += response
        else:
            advantage = float(advantages[adv_at])
            adv_at += 1
        out.append(TrainSample(prompt_ids, response_ids, advantage, old))
    return out


def broadcast_samples(samples: Optional[List[TrainSample]], dims) -> List[TrainSample]:
    """Collective over the default group. Rank 0 passes the samples, the others None; every rank
    returns the samples (rank 0: its own list; others: tensor views, see the module docstring)."""
    if dims.world_size == 1:
        return samples
    if dims.rank == 0:
        if samples is None:
            raise ValueError("broadcast_samples: rank 0 (the driver) must pass the samples, got None")
        tensors = pack_samples(samples)
        for tensor in tensors:
            if tensor.numel():
                dist.broadcast(tensor, src=0)
        return samples
    header = torch.empty(5, dtype=torch.int64, device=_CPU)
    dist.broadcast(header, src=0)
    count, id_total, lp_total, adv_total, id_code = header.tolist()
    tensors = [torch.empty((count, 3), dtype=torch.int64, device=_CPU),
               torch.empty(id_total, dtype=_ID_DTYPES[id_code], device=_CPU),
               torch.empty(lp_total, dtype=torch.float32, device=_CPU),
               torch.empty(adv_total, dtype=torch.float64, device=_CPU)]
    for tensor in tensors:
        if tensor.numel():
            dist.broadcast(tensor, src=0)
    return unpack_samples(*tensors)
