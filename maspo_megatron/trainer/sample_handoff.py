"""The driver's rollout samples to every rank as flat tensors (not pickled Python lists).

    samples = broadcast_samples(samples_on_rank0 if dims.rank == 0 else None, dims)

Global rank 0 (the driver) flattens the samples into CPU tensors and broadcasts them over the
default group; every other rank gets TrainSamples whose fields are views into those tensors:

    header[4]    int64  N, id count, log-prob count, advantage count
    counts[N,3]  int64  prompt tokens, response tokens, flags (1: per-token advantage, 2: has log-probs)
    ids[I]       int32  prompt then response ids of every sample, sample after sample (a token id
                        beyond int32 is an error: no tokenizer has 2**31 tokens)
    log_probs[L] fp32   response log-probs of the samples that have them (the engines' precision,
                        and what the packer stores)
    advantages[A] fp64  one value per scalar-advantage sample, r values per per-token sample (exact)

ids and log-probs travel in chunks of consecutive samples (~2M ids each, `_chunks`, computed from
`counts` on every rank), as asynchronous broadcasts: gloo sends one chunk from its own threads while
rank 0 reads the next one out of Python lists (`_flat`), which is where the time goes when the driver
holds lists (~20 ns a number; pickling them costs ~4x that, and unpickling more).

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
CHUNK_IDS = 1 << 21  # token ids per broadcast (8 MiB of int32), the default of broadcast_samples(chunk_ids=)
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


def _describe(samples: Sequence[TrainSample]) -> tuple[List[tuple[int, int, int]], torch.Tensor]:
    """(counts: per sample (prompt tokens, response tokens, flags), advantages[A] fp64), checked."""
    counts, adv_parts = [], []
    for index, sample in enumerate(samples):
        per_token = not _is_scalar(sample.advantage)
        _check_lengths(index, sample, per_token)
        flags = (_PER_TOKEN_ADVANTAGE if per_token else 0) | (_HAS_LOG_PROBS if sample.old_log_probs is not None else 0)
        counts.append((len(sample.prompt_ids), len(sample.response_ids), flags))
        adv_parts.append(sample.advantage if per_token else [float(sample.advantage)])
    return counts, _flat(adv_parts, torch.float64)


def _chunks(counts: Sequence[Sequence[int]], chunk_ids: int) -> List[tuple[int, int, int, int]]:
    """(first sample, end sample, ids, log-probs) of consecutive sample ranges of about `chunk_ids`
    ids: one broadcast each, so that sending one overlaps packing the next (same on every rank)."""
    out, first, ids, log_probs = [], 0, 0, 0
    for index, (prompt, response, flags) in enumerate(counts):
        ids += prompt + response
        log_probs += response if flags & _HAS_LOG_PROBS else 0
        if ids >= chunk_ids or index == len(counts) - 1:
            out.append((first, index + 1, ids, log_probs))
            first, ids, log_probs = index + 1, 0, 0
    return out


def _chunk_tensors(samples: Sequence[TrainSample], first: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32, log_probs fp32) of samples[first:end]; an id that does not fit int32 is an error."""
    chunk = samples[first:end]
    id_parts = [part for sample in chunk for part in (sample.prompt_ids, sample.response_ids)]
    try:
        if not all(_fits_int32(p) for p in id_parts if isinstance(p, torch.Tensor)):
            raise OverflowError  # a tensor cast to int32 would wrap silently
        ids = _flat(id_parts, torch.int32)
    except OverflowError:
        bad = next(first + i for i, s in enumerate(chunk) if not all(
            _fits_int32(torch.as_tensor(p, dtype=torch.int64)) for p in (s.prompt_ids, s.response_ids)))
        raise ValueError(f"TrainSample.prompt_ids/response_ids: a token id does not fit int32 (sample {bad})") from None
    log_probs = _flat([s.old_log_probs for s in chunk if s.old_log_probs is not None], torch.float32)
    return ids, log_probs


def pack_samples(samples: Sequence[TrainSample]) -> List[torch.Tensor]:
    """[header[4], counts[N, 3], ids[I], log_probs[L], advantages[A]] on the CPU (see the module
    docstring), in one piece (broadcast_samples sends ids and log-probs chunk by chunk)."""
    counts, advantages = _describe(samples)
    parts = [_chunk_tensors(samples, first, end) for first, end, _, _ in _chunks(counts, CHUNK_IDS)]
    ids = torch.cat([p[0] for p in parts]) if parts else torch.empty(0, dtype=torch.int32, device=_CPU)
    log_probs = torch.cat([p[1] for p in parts]) if parts else torch.empty(0, dtype=torch.float32, device=_CPU)
    return [_header(counts, advantages), torch.tensor(counts, dtype=torch.int64, device=_CPU).reshape(-1, 3),
            ids, log_probs, advantages]


def _header(counts: Sequence[Sequence[int]], advantages: torch.Tensor) -> torch.Tensor:
    ids = sum(p + r for p, r, _ in counts)
    log_probs = sum(r for _, r, flags in counts if flags & _HAS_LOG_PROBS)
    return torch.tensor([len(counts), ids, log_probs, advantages.numel()], dtype=torch.int64, device=_CPU)


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


def _send(samples: List[TrainSample], chunk_ids: int) -> None:
    counts, advantages = _describe(samples)
    dist.broadcast(_header(counts, advantages), src=0)
    if not counts:
        return
    dist.broadcast(torch.tensor(counts, dtype=torch.int64, device=_CPU), src=0)
    pending = []  # (tensor, work): each tensor alive until its broadcast is done
    for first, end, _, _ in _chunks(counts, chunk_ids):
        for tensor in _chunk_tensors(samples, first, end):  # packed while the previous chunk travels
            if tensor.numel():
                pending.append((tensor, dist.broadcast(tensor, src=0, async_op=True)))
    if advantages.numel():
        dist.broadcast(advantages, src=0)
    for _, work in pending:
        work.wait()


def _receive(chunk_ids: int) -> List[TrainSample]:
    header = torch.empty(4, dtype=torch.int64, device=_CPU)
    dist.broadcast(header, src=0)
    count, id_total, lp_total, adv_total = header.tolist()
    if count == 0:
        return []
    counts = torch.empty((count, 3), dtype=torch.int64, device=_CPU)
    dist.broadcast(counts, src=0)
    ids = torch.empty(id_total, dtype=torch.int32, device=_CPU)
    log_probs = torch.empty(lp_total, dtype=torch.float32, device=_CPU)
    advantages = torch.empty(adv_total, dtype=torch.float64, device=_CPU)
    pending, id_at, lp_at = [], 0, 0
    for _, _, id_count, lp_count in _chunks(counts.tolist(), chunk_ids):
        for flat, at, size in ((ids, id_at, id_count), (log_probs, lp_at, lp_count)):
            if size:
                pending.append(dist.broadcast(flat[at:at + size], src=0, async_op=True))
        id_at, lp_at = id_at + id_count, lp_at + lp_count
    if adv_total:
        dist.broadcast(advantages, src=0)
    for work in pending:
        work.wait()
    return unpack_samples(counts, ids, log_probs, advantages)


def broadcast_samples(samples: Optional[List[TrainSample]], dims, *, chunk_ids: int = CHUNK_IDS) -> List[TrainSample]:
    """Collective over the default group. Rank 0 passes the samples, the others None; every rank
    returns the samples (rank 0: its own list; others: tensor views, see the module docstring).
    The token ids travel in broadcasts of about `chunk_ids` ids each (the same value on every rank)."""
    if dims.world_size == 1:
        return samples
    if dims.rank != 0:
        return _receive(chunk_ids)
    if samples is None:
        raise ValueError("broadcast_samples: rank 0 (the driver) must pass the samples, got None")
    _send(samples, chunk_ids)
    return samples
