"""Aggregation of per-token losses into this shard's contribution to the global-batch loss.

Every mode divides by constants of the WHOLE global batch (all data-parallel ranks, all
micro-batches), passed in by the caller. Summing `aggregate_loss` over micro-batches and ranks
therefore gives the same loss, and the same gradient, however the batch was cut (the official
MASPO code divides by the micro-batch token count instead, which makes a token's weight depend
on the layout). A normaliser left as None is computed from this shard alone, which is right
only when the shard IS the global batch (single process, one micro-batch).

    token-mean:              sum_t loss_t / N_tokens
    seq-mean-token-mean:     sum_s (sum_{t in s} loss_t / n_s) / N_samples
    seq-mean-token-sum:      sum_t loss_t / N_samples
    seq-mean-token-sum-norm: sum_t loss_t / (N_samples * norm_length)          (Dr.GRPO)

One mode is layout-DEPENDENT on purpose, for faithful reproductions of the official MASPO code
(FlyTune/MASPO-RL, verl's `agg_loss` token-mean called per micro-batch, scaled by 1/gradient
accumulation in `dp_actor.py`, gradients averaged over data-parallel ranks):

    token-mean-microbatch:   (sum_t loss_t / n_micro_batch_tokens) / N_micro_batches

where n_micro_batch_tokens counts the tokens of THIS micro-batch (all its context-parallel shards)
and N_micro_batches the micro-batches of the optimizer step over all data-parallel ranks. A
token's weight then depends on how the batch was cut; see LAYOUT_DEPENDENT_MODES.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                     "token-mean-microbatch")

# mode -> why its result changes with the layout (micro-batch size, DP size, packing).
LAYOUT_DEPENDENT_MODES = {
    "token-mean-microbatch": "the official MASPO/verl normaliser: each micro-batch is divided by its own token "
                             "count, so a token's weight depends on which micro-batch it landed in",
}

Count = Union[int, float, torch.Tensor]


def _positive(name: str, value: Count) -> torch.Tensor | float:
    if isinstance(value, torch.Tensor):
        # An all-reduced count stays on the device: checking it would cost a host sync per micro-batch.
        return value.detach().reshape(()).to(torch.float64 if value.dtype == torch.float64 else torch.float32)
    number = float(value)
    if not number > 0:
        raise ValueError(f"aggregate_loss: {name} must be > 0, got {number}")
    return number


def _local_sample_count(mask: torch.Tensor, sample_index: Optional[torch.Tensor]) -> int:
    if sample_index is None:
        return int(mask.any(-1).sum())
    return int(torch.unique(sample_index[mask]).numel())


def _token_sample_counts(
    mask: torch.Tensor,
    sample_index: Optional[torch.Tensor],
    sample_token_count: Optional[torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """n_s of the sample each token belongs to, as [B, T] (1 at masked positions)."""
    if sample_index is None:
        if sample_token_count is not None:
            raise ValueError("aggregate_loss: sample_token_count needs sample_index (rows are samples otherwise)")
        counts = mask.sum(-1, keepdim=True).to(dtype).expand(mask.shape)
    else:
        index = torch.where(mask, sample_index.long(), torch.zeros_like(sample_index, dtype=torch.long))
        if bool(mask.any()) and int(index[mask].min()) < 0:
            raise ValueError("aggregate_loss: sample_index must be >= 0 on unmasked tokens")
        if sample_token_count is None:
            sample_token_count = torch.bincount(index[mask], minlength=int(index.max()) + 1)
        elif bool(mask.any()) and int(index[mask].max()) >= sample_token_count.numel():
            raise ValueError(
                f"aggregate_loss: sample_index reaches {int(index[mask].max())} but sample_token_count "
                f"has only {sample_token_count.numel()} entries"
            )
        counts = sample_token_count.to(device=mask.device, dtype=dtype)[index]
    return torch.where(mask, counts, torch.ones_like(counts)).clamp(min=1)


def aggregate_loss(
    loss_tok: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    global_token_count: Optional[Count] = None,
    global_sample_count: Optional[Count] = None,
    sample_index: Optional[torch.Tensor] = None,
    sample_token_count: Optional[torch.Tensor] = None,
    norm_length: Optional[int] = None,
    micro_batch_token_count: Optional[Count] = None,
    micro_batch_count: Count = 1,
) -> torch.Tensor:
    """This shard's contribution (a scalar) to the global-batch loss.

    Args:
        loss_tok[B, T]: per-token loss (from policy_loss); mask[B, T] bool/0-1.
        mode: one of AGGREGATION_MODES.
        global_token_count: response tokens in the whole global batch (token-mean).
        global_sample_count: samples in the whole global batch (seq-* modes).
        sample_index[B, T]: LongTensor, sample id in [0, S) of each token, for packed rows or samples
            split across context-parallel shards; without it each row is one sample.
        sample_token_count[S]: each sample's TOTAL response-token count over all shards
            (seq-mean-token-mean); defaults to the count in this shard.
        norm_length: the constant length of seq-mean-token-sum-norm.
        micro_batch_token_count: response tokens of this whole micro-batch, all CP shards
            (token-mean-microbatch); defaults to this shard's count.
        micro_batch_count: micro-batches in the optimizer step over all DP ranks (token-mean-microbatch).
    Returns:
        fp32 (fp64 for fp64 input) scalar; the sum over all shards is the global-batch loss.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"aggregate_loss: unknown mode {mode!r} (expected one of {list(AGGREGATION_MODES)})")
    if loss_tok.shape != mask.shape:
        raise ValueError(f"aggregate_loss: mask has shape {tuple(mask.shape)}, loss_tok has {tuple(loss_tok.shape)}")
    if sample_index is not None and sample_index.shape != mask.shape:
        raise ValueError(
            f"aggregate_loss: sample_index has shape {tuple(sample_index.shape)}, mask has {tuple(mask.shape)}"
        )
    mask = mask.bool()
    dtype = torch.promote_types(loss_tok.dtype, torch.float32)
    # where, not multiply: a NaN/inf at a masked position must not leak into the sum.
    masked = torch.where(mask, loss_tok.to(dtype), torch.zeros((), dtype=dtype, device=loss_tok.device))
    if mode == "token-mean":
        tokens = int(mask.sum()) if global_token_count is None else global_token_count
        if global_token_count is None and tokens == 0:
            return masked.sum()
        return masked.sum() / _positive("global_token_count", tokens)
    if mode == "token-mean-microbatch":
        tokens = int(mask.sum()) if micro_batch_token_count is None else micro_batch_token_count
        if micro_batch_token_count is None and tokens == 0:
            return masked.sum()  # an empty (padding) micro-batch adds nothing
        return masked.sum() / _positive("micro_batch_token_count", tokens) / _positive("micro_batch_count",
                                                                                    micro_batch_count)
    samples = _local_sample_count(mask, sample_index) if global_sample_count is None else global_sample_count
    if global_sample_count is None and samples == 0:
        return masked.sum()
    samples = _positive("global_sample_count", samples)
    if mode == "seq-mean-token-mean":
        counts = _token_sample_counts(mask, sample_index, sample_token_count, dtype)
        return (masked / counts).sum() / samples
    if mode == "seq-mean-token-sum":
        return masked.sum() / samples
    if norm_length is None:
        raise ValueError("aggregate_loss: mode 'seq-mean-token-sum-norm' needs norm_length (algorithm.norm_length)")
    return masked.sum() / (samples * _positive("norm_length", norm_length))
