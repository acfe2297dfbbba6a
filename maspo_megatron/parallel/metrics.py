"""Reduce per-micro-batch SUMS over micro-batches, DP and CP, and bring them to global rank 0.

Megatron's `forward_backward_func` returns, on the LAST pipeline stage only, one dict per
micro-batch (what the loss function put in its third output). Every value there must be a SUM
or a COUNT (never a mean): sums add up across micro-batches and ranks, means would not.

    sums = reduce_sums(losses_reduced, dims)   # {key: float} on global rank 0, None elsewhere

- micro-batches: summed locally, on the rank's device (ParallelDims.device), one host copy at the end;
- DP x CP: all-reduce(SUM) over dims.dp_cp_group (each token lives on exactly one DP x CP rank);
- TP: the loss inputs are TP-replicated (the fused log-prob function all-reduces over TP), so the
  values are equal on all TP ranks; the TP-rank-0 copy is used, never a sum over TP;
- PP: only the last stage has values; it broadcasts them over its PP group to the first stage,
  so global rank 0 (first stage, TP/CP/DP rank 0) ends up with them.
Every rank must call it (collectives inside), with the same key set on every last-stage rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _sum_micro_batches(losses_reduced: list, device: torch.device) -> dict[str, torch.Tensor]:
    """{key: fp64 scalar on `device`}: the micro-batches' values added (no host round trip per value)."""
    totals: dict[str, torch.Tensor] = {}
    for item in losses_reduced:
        for key, value in item.items():
            value = torch.as_tensor(value, device=device).detach().to(torch.float64).reshape(())
            totals[key] = totals[key] + value if key in totals else value
    return totals


def reduce_sums(losses_reduced: list, dims) -> Optional[dict[str, float]]:
    """{key: global sum} on global rank 0; None on every other rank."""
    keys_and_values = None
    if dims.is_last_stage:
        totals = _sum_micro_batches(losses_reduced, dims.device)
        keys = sorted(totals)
        if keys:
            stacked = torch.stack([totals[key] for key in keys])
            if dims.dp * dims.cp > 1:
                dist.all_reduce(stacked, group=dims.dp_cp_group)
            keys_and_values = dict(zip(keys, stacked.tolist(), strict=True))
        else:
            keys_and_values = {}
    # Only the pipeline that contains global rank 0 needs to move the result to it.
    on_root_pipeline = dims.tp_rank == 0 and dims.cp_rank == 0 and dims.dp_rank == 0
    if dims.pp > 1 and on_root_pipeline:
        box = [keys_and_values]
        dist.broadcast_object_list(box, src=dims.pp_last_global_rank, group=dims.pp_group)
        keys_and_values = box[0]
    return keys_and_values if dims.rank == 0 else None
