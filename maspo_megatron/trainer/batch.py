"""The packed micro-batch the trainer feeds to Megatron, and a simple packer.

Several samples (prompt + response) share one row of length S. Position ids restart at 0 for
each sample; a token attends to earlier tokens of its own sample only. How attention is told
where samples end depends on the layer spec (models/provider.attention_backend):
- "te" / "packed" (GPU): THD packing, ONE row per micro-batch, `packed_seq_params()` with the
  segment boundaries `cu_seqlens` (of the whole row, kept through the CP split) and no mask;
- "dense" (CPU only): a block-diagonal causal [R, 1, S, S] mask (`attention_mask()`), O(S^2).

Alignment: logits at position t predict token t+1, so `target[t] = tokens[t+1]` and
`loss_mask[t]` is True when tokens[t+1] is a response token of the same sample. A sample with
prompt length p and response length r has exactly r loss positions, t = p-1 .. p+r-2.

Global normalisers (`global_token_count`, `global_sample_count`, `sample_token_count`) describe
the WHOLE global batch, on every micro-batch of every DP rank, so that per-micro-batch loss
contributions sum to the global-batch loss whatever the layout (trainer/loss.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from maspo_megatron.parallel.context import packed_zigzag_indices, split_for_cp, zigzag_indices


@dataclasses.dataclass
class TrainSample:
    """One rollout sample as the packer takes it (response tokens only carry the loss).

    advantage: a scalar (GRPO: one per sample) or one value per response token.
    old_log_probs[r]: behaviour-policy log-probs of the response tokens (None: zeros; the
    trainer then fills them from its own forward pass before the update).
    """

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    advantage: Union[float, Sequence[float]]
    old_log_probs: Optional[Sequence[float]] = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


_SEQ_FIELDS = ("tokens", "position_ids", "segment_ids", "target", "loss_mask", "advantages", "old_log_probs",
               "sample_index", "rollout_log_probs", "ref_log_probs")


@dataclasses.dataclass
class PackedMicroBatch:
    """R packed rows of length S (all [R, S] unless noted).

    tokens, position_ids (reset per sample), segment_ids (global sample id, -1 on row padding),
    target (next token id, 0 where unused), loss_mask (bool), advantages (fp32),
    old_log_probs (fp32), sample_index (global sample id, 0 where masked),
    rollout_log_probs (fp32: the engine's, as packed from TrainSample.old_log_probs, never overwritten),
    ref_log_probs (fp32: the reference policy's; zeros until a reference model fills them),
    sample_token_count[N] (response tokens of each of the N samples of the global batch),
    global_token_count / global_sample_count (ints, whole global batch),
    cu_seqlens[k+1] (int32, on the host, THD only: one row): boundaries of the row's segments
    (samples with their padding, then the row padding) in the WHOLE row, set by
    `with_segment_bounds()` before the CP split and kept by it; max_seqlen: the longest segment.
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    target: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    old_log_probs: torch.Tensor
    sample_index: torch.Tensor
    sample_token_count: torch.Tensor
    global_token_count: int
    global_sample_count: int
    rollout_log_probs: torch.Tensor
    ref_log_probs: torch.Tensor
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0

    @property
    def local_token_count(self) -> torch.Tensor:
        """Int32 scalar on the batch's device: response tokens of this (CP-sharded) micro-batch."""
        return self.loss_mask.sum(dtype=torch.int32)

    def attention_mask(self) -> torch.Tensor:
        """BoolTensor[R, 1, S, S], True = masked out (Megatron's convention): block-diagonal causal."""
        seg = self.segment_ids
        length = seg.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
        allowed = (same & causal) | torch.eye(length, dtype=torch.bool, device=seg.device)
        return (~allowed)[:, None]

    def segment_bounds(self, row: int = 0) -> torch.Tensor:
        """IntTensor[k+1] (cpu): boundaries of the segments (samples and padding runs) of one unsharded row."""
        seg = self.segment_ids[row].cpu()
        change = torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1
        bounds = [0, *change.tolist(), seg.numel()]
        return torch.tensor(bounds, dtype=torch.int32, device="cpu")

    def with_segment_bounds(self) -> PackedMicroBatch:
        """The THD form: `cu_seqlens` and `max_seqlen` of the (single) row, computed before any CP split."""
        if self.tokens.shape[0] != 1:
            raise ValueError("THD packing has one row per micro-batch (rows_per_micro_batch=1)")
        bounds = self.segment_bounds(0)
        return dataclasses.replace(self, cu_seqlens=bounds, max_seqlen=int((bounds[1:] - bounds[:-1]).max()))

    def packed_seq_params(self, on_device: bool):
        """Megatron's THD `PackedSeqParams` of the row (models/packed_attention.thd_packed_seq_params).

        cu_seqlens stay on the host (`to()` does not move them): Megatron's unfused THD RoPE reads
        them with `.tolist()` in every layer, a device sync each when they live on a GPU.
        on_device=True copies them to the batch's device (Transformer Engine's kernels need that).
        """
        from maspo_megatron.models.packed_attention import thd_packed_seq_params

        if self.cu_seqlens is None:
            raise ValueError("packed_seq_params: the batch has no segment bounds (with_segment_bounds() at packing)")
        bounds = self.cu_seqlens.to(self.tokens.device, non_blocking=True) if on_device else self.cu_seqlens
        return thd_packed_seq_params(bounds, max_seqlen=self.max_seqlen)

    def to(self, device: torch.device) -> PackedMicroBatch:
        """Every tensor on `device`; to a GPU through pinned memory without blocking the host."""
        device = torch.device(device)

        def move(tensor):
            if tensor is None or tensor.device == device:
                return tensor
            if device.type == "cuda" and tensor.device.type == "cpu":
                return tensor.pin_memory().to(device, non_blocking=True)
            return tensor.to(device)

        return dataclasses.replace(self, **{f: move(getattr(self, f)) for f in (*_SEQ_FIELDS, "sample_token_count")})

    def cp_shard(self, cp_size: int, cp_rank: int, *, per_sample: bool = False) -> PackedMicroBatch:
        """This CP rank's tokens (zig-zag): of each whole row, or of each packed sample (THD)."""
        if cp_size == 1:
            return self
        if per_sample:
            if self.tokens.shape[0] != 1:
                raise ValueError("cp_shard(per_sample=True): THD packing has one row per micro-batch")
            bounds = self.cu_seqlens if self.cu_seqlens is not None else self.segment_bounds(0)
            indices = packed_zigzag_indices(bounds, cp_size, cp_rank)
        else:
            indices = zigzag_indices(self.tokens.shape[1], cp_size, cp_rank)
        return dataclasses.replace(self, **{f: split_for_cp(getattr(self, f), indices) for f in _SEQ_FIELDS})


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row, first-fit decreasing (deterministic: ties keep input order)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for row, room in enumerate(free):
            if lengths[index] <= room:
                rows[row].append(index)
                free[row] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(capacity - lengths[index])
    return [sorted(row) for row in rows]


def pack_micro_batches(samples: Sequence[TrainSample], *, row_tokens: int, rows_per_micro_batch: int = 1,
                       dp_size: int = 1, row_multiple: int = 1, sample_multiple: int = 1,
                       fixed_row_len: bool = False, min_micro_batches: int = 1) -> list[list[PackedMicroBatch]]:
    """Packs the GLOBAL batch: returns, for each DP rank, its list of micro-batches.

    row_tokens: capacity of one row (trainer.micro_batch_tokens). row_multiple: S is rounded up
    to it (tp for sequence parallel, 2*cp for context parallel). sample_multiple: each sample
    is padded to it (2*cp for the per-sample THD CP split). fixed_row_len: every micro-batch
    gets S = row_tokens (pipeline parallel needs one activation shape). Every DP rank gets the
    same number of micro-batches, at least `min_micro_batches` (all-padding rows fill the gaps;
    pipeline parallel wants at least pp micro-batches to fill the pipeline).
    """
    if not samples:
        raise ValueError("pack_micro_batches: no samples")
    lengths = []
    for index, sample in enumerate(samples):
        if len(sample.prompt_ids) < 1:
            raise ValueError(f"pack_micro_batches: sample {index} has an empty prompt (needs >= 1 token)")
        padded = _round_up(len(sample), sample_multiple)
        if padded > row_tokens:
            raise ValueError(f"trainer.micro_batch_tokens: sample {index} needs {padded} tokens, "
                             f"more than the row capacity {row_tokens}")
        lengths.append(padded)
    rows = _first_fit(lengths, row_tokens)
    # Rows to DP ranks: greedy to the least loaded rank, heaviest rows first.
    per_rank: list[list[list[int]]] = [[] for _ in range(dp_size)]
    load = [0] * dp_size
    for row in sorted(rows, key=lambda r: -sum(lengths[i] for i in r)):
        rank = load.index(min(load))
        per_rank[rank].append(row)
        load[rank] += sum(lengths[i] for i in row)
    micro_batches = max(min_micro_batches, max(-(-len(r) // rows_per_micro_batch) for r in per_rank))
    sample_token_count = torch.tensor([len(s.response_ids) for s in samples], dtype=torch.long, device="cpu")
    normalisers = {
        "sample_token_count": sample_token_count,
        "global_token_count": int(sample_token_count.sum()),
        "global_sample_count": int((sample_token_count > 0).sum()),
    }
    out = []
    for rank_rows in per_rank:
        rank_rows = rank_rows + [[]] * (micro_batches * rows_per_micro_batch - len(rank_rows))
        batches = []
        for start in range(0, len(rank_rows), rows_per_micro_batch):
            chunk = rank_rows[start:start + rows_per_micro_batch]
            used = max([sum(lengths[i] for i in row) for row in chunk] + [1])
            row_len = _round_up(row_tokens if fixed_row_len else used, row_multiple)
            batches.append(_build(samples, chunk, lengths, row_len, normalisers))
        out.append(batches)
    return out


def _build(samples, rows: list[list[int]], lengths: list[int], row_len: int, normalisers: dict) -> PackedMicroBatch:
    # Packed on the host; the trainer moves each micro-batch to its device once (PackedMicroBatch.to).
    shape = (len(rows), row_len)
    fields = {
        "tokens": torch.zeros(shape, dtype=torch.long, device="cpu"),
        "position_ids": torch.zeros(shape, dtype=torch.long, device="cpu"),
        "segment_ids": torch.full(shape, -1, dtype=torch.long, device="cpu"),
        "target": torch.zeros(shape, dtype=torch.long, device="cpu"),
        "loss_mask": torch.zeros(shape, dtype=torch.bool, device="cpu"),
        "advantages": torch.zeros(shape, dtype=torch.float32, device="cpu"),
        "old_log_probs": torch.zeros(shape, dtype=torch.float32, device="cpu"),
        "sample_index": torch.zeros(shape, dtype=torch.long, device="cpu"),
        "rollout_log_probs": torch.zeros(shape, dtype=torch.float32, device="cpu"),
        "ref_log_probs": torch.zeros(shape, dtype=torch.float32, device="cpu"),
    }
    for row_index, row in enumerate(rows):
        offset = 0
        for sample_id in row:
            # The sample's own padding (sample_multiple) joins its segment, so THD boundaries
            # (cu_seqlens) are the padded ones; causal masking keeps it invisible to the sample.
            fields["segment_ids"][row_index, offset:offset + lengths[sample_id]] = sample_id
            _place(fields, row_index, offset, sample_id, samples[sample_id])
            offset += lengths[sample_id]
        # Trailing padding: its own positions so that it never looks like part of a sample.
        fields["position_ids"][row_index, offset:] = torch.arange(row_len - offset, device="cpu")
    return PackedMicroBatch(**fields, **normalisers)


def _place(fields: dict, row: int, offset: int, sample_id: int, sample: TrainSample) -> None:
    # Ids arrive as Python lists (the driver) or int tensors (other ranks, trainer/sample_handoff.py):
    # as_tensor takes either without a Python object per token.
    ids = torch.cat([torch.as_tensor(sample.prompt_ids, dtype=torch.long, device="cpu"),
                     torch.as_tensor(sample.response_ids, dtype=torch.long, device="cpu")])
    length, p = ids.numel(), len(sample.prompt_ids)
    r = length - p
    span = slice(offset, offset + length)
    fields["tokens"][row, span] = ids
    fields["position_ids"][row, span] = torch.arange(length, device="cpu")
    if r == 0:
        return
    loss = slice(offset + p - 1, offset + p - 1 + r)
    fields["target"][row, loss] = ids[p:]
    fields["loss_mask"][row, loss] = True
    fields["sample_index"][row, loss] = sample_id
    advantage = torch.as_tensor(sample.advantage, dtype=torch.float32, device="cpu")
    if advantage.dim() == 1 and advantage.numel() != r:
        raise ValueError(f"TrainSample.advantage: {advantage.numel()} values for {r} response tokens (sample {sample_id})")
    fields["advantages"][row, loss] = advantage
    if sample.old_log_probs is not None:
        old = torch.as_tensor(sample.old_log_probs, dtype=torch.float32, device="cpu")
        if old.numel() != r:
            raise ValueError(f"TrainSample.old_log_probs: {old.numel()} values for {r} response tokens (sample {sample_id})")
        fields["old_log_probs"][row, loss] = old
        fields["rollout_log_probs"][row, loss] = old
